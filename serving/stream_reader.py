"""Reading a `GenerateStream` on an asyncio event loop: the one way both fronts (gRPC `Generate`
on the router's aio server, the OpenAI HTTP API under uvicorn) turn a request's backend events into
outputs without a thread per open stream.

    async with contextlib.aclosing(outputs(stream, gone)) as outs:
        async for out in outs:          # Output pieces; raises the stream's GenerateError
            ...

Every backend's handle has an `outbox` (serving/backend.py `Handle`): the in-process ones' writer
is an engine thread, the remote one's the request's task on the backend's own event loop. The
writer wakes the front's loop through a waker; the events are turned into outputs here, on the
loop. With a stream interval (`Outbox.stream_interval_s`, `--stream-interval-ms`) the reader holds
later tokens after sending some: during the hold the waker is muted for token events (a finish or
an error still wakes it), so hundreds of open streams do not wake the loop at every engine step.

`gone` (optional) is set by the caller when the client left: the reader stops. Leaving the reader,
for whatever reason, closes the stream: it cancels what still runs on the backend (freeing its KV)
and gives the admission slot back.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import AsyncIterator

from serving.engine_loop import Outbox, TokenEvent
from serving.generation import GenerateStream, Output


async def outputs(stream: GenerateStream, gone: asyncio.Event | None = None) -> AsyncIterator[Output]:
    """The stream's outputs on the running loop (see the module docstring); closes it when left."""
    gone = gone if gone is not None else asyncio.Event()
    try:
        async for out in _from_outbox(stream, stream.handle.outbox, gone):
            yield out
    finally:
        stream.close()


class _LoopWaker:
    """Sets asyncio events of one loop from other threads with one wake-up of the loop per batch:
    the first `set` after the loop ran the last batch schedules it, later ones join it. A decode
    step updates a hundred streams; one `call_soon_threadsafe` each was a write to the loop's
    self-pipe each, under the writer's lock."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Event] = []

    def set(self, event: asyncio.Event) -> None:
        with self._lock:
            self._pending.append(event)
            if len(self._pending) > 1:
                return  # a batch is already scheduled and not yet run
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for event in pending:
            event.set()


_loop_wakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker]" = weakref.WeakKeyDictionary()


def _waker_of(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    """The loop's waker (created on the loop's own thread, the only one that asks)."""
    waker = _loop_wakers.get(loop)
    if waker is None:
        waker = _loop_wakers[loop] = _LoopWaker(loop)
    return waker


async def _from_outbox(stream: GenerateStream, outbox: Outbox, gone: asyncio.Event) -> AsyncIterator[Output]:
    loop = asyncio.get_running_loop()
    loop_waker = _waker_of(loop)
    wake = asyncio.Event()
    holding = False  # read by the writer's thread: a bool swap is atomic under the GIL

    def waker() -> None:  # on the engine thread, after every put
        if holding and not outbox.final_put:
            return  # a token during a hold: it waits in the outbox until the hold ends
        loop_waker.set(wake)

    gone_task = asyncio.ensure_future(gone.wait())
    gone_task.add_done_callback(lambda _: wake.set())
    outbox.set_waker(waker)
    interval = outbox.stream_interval_s
    try:
        while not gone.is_set():
            wake.clear()
            events = outbox.drain()
            if not events:
                await wake.wait()
                continue
            sent_tokens = False
            for event in events:
                if (out := stream.on_event(event)) is not None:
                    yield out
                    sent_tokens = sent_tokens or isinstance(event, TokenEvent)
                if stream.finished:
                    return
            if interval > 0 and sent_tokens and not gone.is_set():
                # Hold: sleep out the interval unless a finish, an error or the client's leaving wakes us.
                # A timer, not asyncio.wait_for: that wraps the wait in a task of its own per hold.
                holding = True
                wake.clear()
                timer = loop.call_later(interval, wake.set)
                try:
                    if not outbox.final_put:
                        await wake.wait()
                finally:
                    timer.cancel()
                    holding = False
    finally:
        outbox.set_waker(None)
        gone_task.cancel()
