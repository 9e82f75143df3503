"""Disaggregation in one process, for real: every instance on its own host thread.

`DisaggEngine.step` drives all instances from one loop, so a decode step still waits for the
prefill dispatched before it. Here each prefill and each decode instance runs its own loop:

    prefill thread:  [lock] pick + dispatch -> wait for tokens -> [lock] record, stage KV
    decode thread:   [lock] pull staged KV + pick + dispatch -> wait for tokens -> [lock] record

One lock guards all host bookkeeping (queues, block managers, request records); device work is
dispatched under it (fast: JAX dispatch is asynchronous) and waited for outside it, so instances on
different devices compute at the same time.

KV staging: a decode pull that gathered from the prefill pool would be ordered after whatever
prefill was dispatched last on that pool (the pool is one donated buffer chain), i.e. decode would
wait for a running prefill. So the prefill thread gathers each prefilled request's blocks into
standalone arrays right when its prefill completes, before it dispatches the next batch; the decode
thread moves those. The request keeps its prefill blocks until it is pulled, so prefill memory
still buffers bursts and backpressure is unchanged; the staged copy costs as much device memory
again for requests waiting to be pulled.

Wake-ups: every thread waits on its own condition of the one lock, and is woken only by the change
it waits for, never by all the others' (with 16 + 16 instances, one shared condition's
notify_all woke ~50 threads per event, each to take the interpreter lock and sleep again: 40% of
the server's CPU was system time, and it used twice the CPU it does now). Who wakes whom:

    request queued            -> the launcher of the prefill instance it was queued on
    prefill batch launched    -> that instance's collector
    prefill batch completed   -> its launcher (a pipeline slot freed); the collector pulls what
                                 decode can take and wakes the decode instances it pulled into
    KV pulled off a prefill   -> that prefill instance's launcher (its blocks freed)
    decode step completed     -> nobody: the same thread pulls and launches next
    preemption                -> every prefill launcher (recompute requeued; rare)
    request finished          -> `wait()`ers
    abort, error, stop        -> everybody
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from dsjax.engine.disaggregated import DecodeInstance, DisaggEngine, PrefillInstance
from dsjax.engine.request import Request


class ThreadedDisaggEngine:
    def __init__(self, engine: DisaggEngine, on_update: Callable[[list[Request]], None] | None = None):
        """`on_update(reqs)` runs whenever a batch's requests got tokens or finished, on the
        instance thread that recorded them, outside the engine lock (so another instance's launch
        does not wait for a batch's updates): it must be thread-safe and read what it needs from
        each request (a request's tokens only grow, and a later update covers an earlier one)."""
        self.engine = engine
        self.on_update = on_update or (lambda reqs: None)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # `wait()`: a request finished, or an error
        # One condition per waiting thread, all on the one lock (see the module docstring).
        self._launch_cv = {id(p): threading.Condition(self._lock) for p in engine.prefill}
        self._collect_cv = {id(p): threading.Condition(self._lock) for p in engine.prefill}
        self._decode_cv = {id(d): threading.Condition(self._lock) for d in engine.decode}
        self._stop = False
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "ThreadedDisaggEngine":
        for i, inst in enumerate(self.engine.prefill):
            self._threads.append(threading.Thread(target=self._guard, args=(self._prefill_loop, inst), name=f"prefill-{i}", daemon=True))
        for i, inst in enumerate(self.engine.decode):
            self._threads.append(threading.Thread(target=self._guard, args=(self._decode_loop, inst), name=f"decode-{i}", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._wake_everybody()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- wake-ups (caller holds the lock) ----------------------------------------------------
    def _wake_everybody(self) -> None:
        for cv in (self._cv, *self._launch_cv.values(), *self._collect_cv.values(), *self._decode_cv.values()):
            cv.notify_all()

    def _finished(self, reqs: list[Request]) -> None:
        self.engine._done(reqs)
        if reqs:
            self._cv.notify_all()

    def _pull(self) -> None:
        """Move what decode can take; wake the decode instances pulled into and the launchers of
        the prefill instances whose blocks were freed."""
        for src, dst in self.engine._pull():
            self._launch_cv[id(src)].notify()
            self._decode_cv[id(dst)].notify()

    def _requeue(self, preempted: list[Request]) -> None:
        if preempted:
            self.engine.requeue(preempted)
            for cv in self._launch_cv.values():
                cv.notify()

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        with self._lock:
            inst = self.engine.add_request(req)
            self._launch_cv[id(inst)].notify()

    def abort(self, request_id: str) -> bool:
        with self._lock:
            found = self.engine.abort(request_id)
            if found:  # blocks freed anywhere, a queue shortened: rare enough to wake everybody
                self._wake_everybody()
            return found

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.engine.has_unfinished()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every request has finished (True) or `timeout` passes (False); re-raises
        an error from an instance thread."""
        with self._lock:
            done = self._cv.wait_for(lambda: self.errors or not self.engine.has_unfinished(), timeout)
            if self.errors:
                raise RuntimeError("an instance thread failed") from self.errors[0]
            return bool(done)

    # ---- instance loops --------------------------------------------------------------------
    def _guard(self, loop, inst) -> None:
        try:
            loop(inst)
        except BaseException as e:  # surfaced by wait(); the other instances keep their state
            with self._lock:
                self.errors.append(e)
                self._wake_everybody()

    def _prefill_loop(self, inst: PrefillInstance) -> None:
        """Launch one batch at a time while the pipeline has room (a collector thread waits for
        them in order), so with pp stages a new batch starts as soon as the first stage can take
        it, not after the whole previous group left the pipeline (the simulator's
        SimPrefillInstance). Room: fewer than pp batches in flight, or, on a runner that says
        when its first stage frees (`stage_free_in`, the emulated one), that moment."""
        inflight: deque = deque()
        stage_free_in = getattr(inst.runner, "stage_free_in", None)
        cv, collect_cv = self._launch_cv[id(inst)], self._collect_cv[id(inst)]
        collector = threading.Thread(target=self._guard, args=(self._prefill_collect, (inst, inflight)),
                                     name=f"{threading.current_thread().name}-collect", daemon=True)
        collector.start()
        while True:
            with self._lock:
                while not self._stop:
                    wait = stage_free_in() if stage_free_in is not None else 0.0
                    room = wait <= 0.0 if stage_free_in is not None else len(inflight) < inst.runner.pp
                    if room and (pending := inst.launch(max_batches=1)) is not None:
                        inflight.append(pending)
                        collect_cv.notify()
                        continue
                    cv.wait(wait if wait > 0.0 else None)
                if self._stop:
                    break
        collector.join(1.0)

    def _prefill_collect(self, arg) -> None:
        inst, inflight = arg
        cv, launch_cv = self._collect_cv[id(inst)], self._launch_cv[id(inst)]
        while True:
            with self._lock:
                while not self._stop and not inflight:
                    cv.wait()
                if self._stop:
                    return
                pending = inflight[0]
            outs = inst.runner.collect(pending[1])
            with self._lock:
                inflight.popleft()
                prefilled, finished = inst.complete(pending, outs, stage_kv=True)
                self._finished(finished)
                launch_cv.notify()
                if prefilled:
                    self._pull()
            if prefilled or finished:
                self.on_update(prefilled + finished)

    def _decode_loop(self, inst: DecodeInstance) -> None:
        """Pull, pick and dispatch under the lock; wait for the tokens outside it. Overlapped
        (`inst.overlap`): the next step is dispatched before the previous one is waited for."""
        inflight = None  # (batch, launched) dispatched and not yet recorded
        cv = self._decode_cv[id(inst)]
        while True:
            with self._lock:
                batch: list[Request] = []
                while not self._stop:
                    self._pull()  # blocks this instance's last step freed may take a waiting request
                    batch, preempted, launched = inst.launch(after=inflight if inst.overlap else None)
                    self._requeue(preempted)
                    if batch or inflight is not None:
                        break
                    cv.wait()
                if self._stop:
                    return
            if inst.overlap:  # record the step dispatched before this one
                prev, inflight = inflight, ((batch, launched) if batch else None)
                if prev is None:
                    continue  # nothing was in flight: this step is recorded after the next dispatch
                batch, launched = prev
            outs = inst.runner.collect(launched)
            with self._lock:
                self._finished(inst.complete(batch, outs))
            self.on_update(batch)
