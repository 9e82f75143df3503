"""A request's outbox: events in order, token events that queued up while the reader was busy
merged into one message, nothing after the final event."""

import grpc

from dsjax.engine.request import FinishReason
from serving.engine_loop import ErrorEvent, FinishEvent, Outbox, TokenEvent


def test_queued_tokens_merge_and_order_holds():
    box = Outbox()
    box.put(TokenEvent((), migration="m1"))
    box.put(TokenEvent((1,)))
    box.put(TokenEvent((2, 3)))
    box.put(FinishEvent(FinishReason.LENGTH))
    box.put(TokenEvent((9,)))  # after the end: dropped
    events = list(box)
    assert events == [TokenEvent((1, 2, 3), migration="m1"), FinishEvent(FinishReason.LENGTH)]


def test_two_migrations_are_not_merged_and_errors_end_the_stream():
    box = Outbox()
    box.put(TokenEvent((1,), migration="a"))
    box.put(TokenEvent((2,), migration="b"))
    box.put(ErrorEvent(grpc.StatusCode.ABORTED, "preempted"))
    events = list(box)
    assert [e.token_ids for e in events[:2]] == [(1,), (2,)] and [e.migration for e in events[:2]] == ["a", "b"]
    assert isinstance(events[2], ErrorEvent) and box.closed


def test_reader_gets_tokens_as_they_come():
    box = Outbox()
    it = iter(box)
    box.put(TokenEvent((5,)))
    assert next(it) == TokenEvent((5,))
    box.put(TokenEvent((6,)))
    assert next(it) == TokenEvent((6,))
