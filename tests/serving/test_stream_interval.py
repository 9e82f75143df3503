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
