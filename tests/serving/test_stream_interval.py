"""`--stream-interval-ms` (serving/engine_loop.py, Outbox.stream_interval_s): later tokens of a
stream are held and sent together; the first token and the finish never wait."""

import threading
import time

from serving.engine_loop import FinishEvent, Outbox, TokenEvent


def _read(interval_s, monkeypatch, steps=12, step_s=0.01):
    monkeypatch.setattr(Outbox, "stream_interval_s", interval_s)
    box = Outbox()

    def write():
        for i in range(steps):
            box.put(TokenEvent((i,)))
            time.sleep(step_s)
        box.put(FinishEvent("length"))

    t0 = time.monotonic()
    threading.Thread(target=write, daemon=True).start()
    got = [(time.monotonic() - t0, e) for e in box]
    return got


def test_tokens_are_held_but_first_and_finish_are_not(monkeypatch):
    plain = _read(0.0, monkeypatch)
    assert len(plain) == 13 and all(len(e.token_ids) == 1 for _, e in plain[:-1])
    held = _read(0.05, monkeypatch)
    tokens = [e.token_ids for _, e in held if isinstance(e, TokenEvent)]
    assert sum(tokens, ()) == tuple(range(12)) and tokens[0] == (0,)
    assert held[0][0] < 0.01  # the first token at once
    assert 3 <= len(tokens) <= 5  # ~120 ms of steps in 50 ms holds, not 12 messages
    assert isinstance(held[-1][1], FinishEvent) and held[-1][0] - held[-2][0] < 0.02  # the last token with the finish


# The asyncio reader both fronts use (serving/stream_reader.py): the same holds on an event loop.

def _generation(step_s):
    from models.config import PRESETS
    from models.tokenizer import ByteTokenizer
    from serving.generation import Generation
    from tests.support.serving import FakeBackend

    config = PRESETS["tiny-llama"]
    backend = FakeBackend(step_s=step_s)
    return backend, Generation(backend, ByteTokenizer(config.vocab_size), config)


def _request(max_tokens):
    from serving.proto.dsjax.v1 import dsjax_pb2 as pb

    return pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=max_tokens))


def _read_async(generation, request, *, stop_after=None):
    import asyncio
    import contextlib

    from serving import stream_reader

    async def run():
        stream = generation.start(request)
        t0, got = time.monotonic(), []
        async with contextlib.aclosing(stream_reader.outputs(stream)) as outs:
            async for out in outs:
                got.append((time.monotonic() - t0, out))
                if stop_after is not None and len(got) >= stop_after:
                    break
        return stream, got

    return asyncio.run(run())


def test_async_reader_holds_tokens_but_not_the_first_or_the_finish(monkeypatch):
    backend, generation = _generation(step_s=0.01)
    monkeypatch.setattr(Outbox, "stream_interval_s", 0.0)
    _, plain = _read_async(generation, _request(12))
    assert [len(o.token_ids) for _, o in plain[:-1]] == [1] * 12 and plain[-1][1].finish_reason is not None
    monkeypatch.setattr(Outbox, "stream_interval_s", 0.05)
    _, held = _read_async(generation, _request(12))
    tokens = [o.token_ids for _, o in held if o.token_ids]
    assert sum(tokens, []) == sum((o.token_ids for _, o in plain), [])  # the same tokens, fewer messages
    assert tokens[0] == plain[0][1].token_ids and held[0][0] < 0.05
    assert 3 <= len(tokens) <= 5
    assert held[-1][1].finish_reason is not None and held[-1][0] - held[-2][0] < 0.03  # the finish is not held
    assert not generation._active  # admission slots given back


def test_async_reader_left_early_cancels_and_frees_the_slot(monkeypatch):
    monkeypatch.setattr(Outbox, "stream_interval_s", 0.0)
    backend, generation = _generation(step_s=0.02)
    stream, got = _read_async(generation, _request(50), stop_after=2)
    assert len(got) == 2 and stream.request_id in backend.cancelled
    assert not generation._active


def test_a_writers_batch_wakes_the_readers_loop_once():
    """A decode step updates many streams from an engine thread: the reader loop is woken once for
    the batch (one call_soon_threadsafe), and every stream's event is set."""
    import asyncio

    from serving.stream_reader import _LoopWaker

    async def run():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (calls.append(a), real(*a))[1]
        waker, events = _LoopWaker(loop), [asyncio.Event() for _ in range(100)]
        writer = threading.Thread(target=lambda: [waker.set(e) for e in events])
        writer.start()
        writer.join()  # the loop has not run meanwhile: the whole batch is pending
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 5)
        first = len(calls)
        waker.set(events[0])  # after the batch ran, the next set schedules a new one
        await asyncio.sleep(0)
        return first, len(calls)

    assert asyncio.run(run()) == (1, 2)
