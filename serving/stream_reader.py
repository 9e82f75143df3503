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
import time
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


async def _from_outbox(stream: GenerateStream, outbox: Outbox, gone: asyncio.Event) -> AsyncIterator[Output]:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    holding = False  # read by the writer's thread: a bool swap is atomic under the GIL

    def waker() -> None:  # on the engine thread, after every put
        if holding and not outbox.final_put:
            return  # a token during a hold: it waits in the outbox until the hold ends
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

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
                holding = True
                wake.clear()
                deadline = time.monotonic() + interval
                try:
                    if not outbox.final_put:
                        await asyncio.wait_for(wake.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
                finally:
                    holding = False
    finally:
        outbox.set_waker(None)
        gone_task.cancel()
