"""The one thread that drives an engine, and the mailboxes gRPC handlers talk to it through.

JAX calls are not async and the KV pool is donated on every step, so exactly one thread per
process touches the engine and the device: `EngineLoop`. gRPC handler threads never call into
the engine; they `post` closures that the loop runs between steps (add, abort, export, stats),
and read their request's `Outbox`, which the loop fills after each step (tokens already copied
to the host: one copy per step, made by the runner). Every block allocation and free therefore
happens on the loop thread, in order with the steps that read and write those blocks.

    handler thread                     engine thread
    --------------                     -------------
    loop.post(add(req, outbox))  --->  drain commands; step(); outbox.put(TokenEvent)
    for ev in outbox: yield ...  <---
    context callback: loop.post(abort(rid))
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Iterator

import grpc

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    token_ids: tuple[int, ...]
    migration: object | None = None  # worker_pb2.Migration once the KV has landed (decode)
    timing: dict | None = None  # a replica's first token: {"queue_seconds", "prefill_seconds"}


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    reason: object  # dsjax.engine.request.FinishReason
    breakdown: dict | None = None


@dataclasses.dataclass(frozen=True)
class ErrorEvent:
    code: grpc.StatusCode
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


class EngineDead(RuntimeError):
    """The engine thread has died; nothing posted to it will run."""


class Outbox:
    """One request's events, written by the engine thread and read by its handler thread.
    Closed after a FinishEvent or ErrorEvent; later writes are dropped."""

    def __init__(self):
        self._q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._waker: Callable[[], None] | None = None
        # Set by a finish or an error: ends a reader's hold at once. Token events do not set it, so
        # a holding reader sleeps through the steps of its interval instead of waking at each one
        # (hundreds of held streams woke tens of times a second each, and their threads crowded
        # the engine's own thread out of the interpreter lock).
        self._final = threading.Event()

    def put(self, event: Event) -> None:
        with self._lock:
            if self._closed:
                return
            if not isinstance(event, TokenEvent):
                self._closed = True
        self._q.put(event)
        if not isinstance(event, TokenEvent):
            self._final.set()
        waker = self._waker
        if waker is not None:
            waker()

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Call `waker()` after every later put, on the writer's thread: for a reader that waits in
        an event loop (`drain` then sleeps until woken) instead of blocking a thread in `__iter__`."""
        self._waker = waker

    def drain(self, first: Event | None = None, out: list[Event] | None = None) -> list[Event]:
        """The events queued now (after `first`, if given, appended to `out`), without waiting;
        consecutive token events merged into one (a reader that fell behind the engine sends one
        message, not one per step; two that each carry a migration stay apart)."""
        out = [] if out is None else out
        event = first
        while True:
            if event is not None:
                last = out[-1] if out else None
                if (isinstance(event, TokenEvent) and isinstance(last, TokenEvent)
                        and not (last.migration is not None and event.migration is not None)):
                    out[-1] = TokenEvent(last.token_ids + event.token_ids, last.migration or event.migration,
                                         last.timing or event.timing)
                else:
                    out.append(event)
            try:
                event = self._q.get_nowait()
            except queue.Empty:
                return out

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def final_put(self) -> bool:
        """A finish or an error has been put (set before the waker runs)."""
        return self._final.is_set()

    # Seconds a reader holds later tokens after sending some (--stream-interval-ms; 0: none, each
    # step's tokens leave at once). The first token and the finish are never held, so TTFT and
    # TPOT as clients measure them do not change; intermediate tokens arrive in fewer messages.
    stream_interval_s = 0.0

    def __iter__(self) -> Iterator[Event]:
        """Events in order, blocking for each next one; queued token events merged (`drain`),
        and held up to `stream_interval_s` after the previous token message."""
        sent = None  # when the last token message left
        while True:
            if sent is not None:  # hold: sleep out the interval unless a finish or error arrives
                left = sent + self.stream_interval_s - time.monotonic()
                if left > 0:
                    self._final.wait(left)
            # Whatever is queued now (a finish put after the wait ended is in the queue: not lost),
            # else block for the next event.
            events = self.drain() or self.drain(self._q.get())
            for event in events:
                yield event
                if not isinstance(event, TokenEvent):
                    return
            if self.stream_interval_s > 0:
                sent = time.monotonic()


class EngineLoop:
    """Runs posted commands and `step()` on one daemon thread. Subclasses define `busy()` (is
    there device work to do) and `step()`, and may override `tick()` (timers: leases, renewals)."""

    idle_wait_s = 0.02

    def __init__(self, name: str):
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None
        self._timer = None  # serving.step_log.StepTimer once a step log is attached
        self._beat = time.monotonic()  # the start of the loop's current iteration (see stalled_seconds)

    def attach_step_log(self, step_log, runners) -> None:
        """Time every step from now on into `step_log` (serving/step_log.py), with the shapes of
        the program calls of `runners` (their launch hook). Call after warm-up."""
        from serving.step_log import StepTimer

        def attach():
            for r in runners:
                r.launch_hook = step_log.note
            self._timer = StepTimer(step_log)

        self.call(attach)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled_seconds(self) -> float:
        """How long the loop has been inside its current iteration (any thread may ask): an idle
        loop comes round every `idle_wait_s`, a served one once per step, so a value far above a
        step's time means the engine is stuck in a step or a command (a hung device call, a
        deadlock) while the process around it still answers. The heartbeat reports it and the
        router's watchdog acts on it (serving/registry.py)."""
        return max(0.0, time.monotonic() - self._beat) if self._thread.is_alive() else 0.0

    def post(self, fn: Callable[[], None], on_error: Callable[[Exception], None] | None = None) -> None:
        """Run `fn` on the engine thread before its next step (EngineDead if the loop died). If
        `fn` raises, the loop logs it and serves on; `on_error(exception)` (on the engine thread)
        lets the request it belonged to fail."""
        if self.error is not None:
            raise EngineDead(f"engine loop {self._thread.name} died: {self.error!r}")
        if on_error is not None:
            command = fn

            def fn() -> None:
                try:
                    command()
                except Exception as e:
                    on_error(e)
                    raise

        self._commands.put(fn)

    def _post_quietly(self, fn: Callable[[], None]) -> None:
        """`post` from a callback, where a dead loop has nothing left to clean up."""
        try:
            self.post(fn)
        except EngineDead:
            pass

    def call(self, fn: Callable[[], object], timeout: float | None = 30.0) -> object:
        """Run `fn` on the engine thread and return its result (or raise its exception);
        EngineDead if the loop dies first, TimeoutError after `timeout` seconds."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()

        def run():
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the caller
                    fut.set_exception(e)

        self.post(run)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return fut.result(0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic())))
            except FutureTimeout:
                if self.error is not None or not self.alive:
                    raise EngineDead(f"engine loop {self._thread.name} is not running") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    # ---- subclass hooks ------------------------------------------------------------------
    def busy(self) -> bool:
        raise NotImplementedError

    def step(self) -> bool:
        """One unit of device work; returns False when nothing could run (then the loop waits
        briefly for commands instead of spinning)."""
        raise NotImplementedError

    def tick(self) -> None:
        """Timers, run every loop iteration (cheap)."""

    def fail_all(self, error: BaseException) -> None:
        """The loop died: end every request (subclasses override)."""

    # ---- the loop ------------------------------------------------------------------------
    def _drain(self, block: bool, timeout: float | None = None) -> None:
        """Run the posted commands; with `block`, first wait up to `timeout` (default
        `idle_wait_s`) for one."""
        try:
            fn = self._commands.get(timeout=timeout or self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                fn()
            except Exception:  # one failing command fails its own request (post's on_error), not the loop
                log.exception("engine loop %s: a command failed; serving on", self._thread.name)
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        progressed = False
        try:
            while not self._stop.is_set():
                self._beat = time.monotonic()
                self._drain(block=not progressed)
                self.tick()
                timer = self._timer
                if timer is not None:
                    timer.stop()  # a served step ends where the next one could start
                if self.busy():
                    if timer is not None:
                        timer.start()
                    progressed = bool(self.step())
                    if timer is not None and not progressed:
                        timer.stop()  # the next drain blocks: do not count the wait
                else:
                    progressed = False
        except BaseException as e:  # the engine is broken: fail loudly, end every stream
            log.exception("engine loop %s died", self._thread.name)
            self.error = e
            self.fail_all(e)
