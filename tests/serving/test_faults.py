"""Faults that recover, over real loopback gRPC (router, registry, prefill and decode workers in
this process; tests/support/local_cluster.py):

- a decode worker dies mid-stream: its requests are prefilled again from prompt + tokens so far on
  the workers left, and every client stream goes on to the same tokens, none lost or repeated;
  only when no decode worker is left do requests end with UNAVAILABLE, and a restarted one serves;
- a decode worker whose engine hangs while it still heartbeats is quarantined by the watchdog,
  its requests are recomputed elsewhere, and it rejoins routing once it makes progress again.
"""

import concurrent.futures as cf
import threading
import time

import grpc
import pytest

from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from tests.support.local_cluster import LocalCluster

MAX_TOKENS = 120
PROMPTS = [[256, 3 * i + 1, 7, i + 2] for i in range(6)]


def _collect(call) -> tuple[list[int], object]:
    """-> (tokens, finish reason or the status code it failed with); asserts no message repeats."""
    ids, last = [], None
    try:
        for m in call:
            ids += m.token_ids
            last = m
    except grpc.RpcError as e:
        return ids, (e.code(), e.details())
    return ids, (last.finish_reason, last.breakdown.num_recomputes)


def _start_decoding(cluster, prompts, max_tokens=MAX_TOKENS):
    """Streams that have each received tokens past the prefill's: every request is decoding."""
    calls = [cluster.stream(p, max_tokens) for p in prompts]
    firsts = [[t for _ in range(2) for t in next(c).token_ids] for c in calls]
    return calls, firsts


@pytest.fixture(scope="module")
def cluster():
    # 120 tokens at >= 10 ms a step: the requests still decode when a test kills their worker
    with LocalCluster(prefill=1, decode=2, max_recomputes=3, num_blocks=96, decode_step_s=0.01) as c:
        yield c


@pytest.fixture(scope="module")
def reference(cluster):
    """The tokens of every prompt from a clean run (greedy: a recompute must give the same)."""
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        outs = list(pool.map(lambda p: cluster.generate(p, MAX_TOKENS)[0], PROMPTS))
    assert all(len(o) == MAX_TOKENS for o in outs)
    return outs


def _on(cluster, worker_id: str) -> int:
    return next(s.running + s.pulling + s.waiting for s in cluster.registry.instances() if s.worker_id == worker_id)


def test_decode_worker_death_is_recomputed_on_another(cluster, reference):
    calls, firsts = _start_decoding(cluster, PROMPTS)
    assert _on(cluster, "decode-1") > 0 and _on(cluster, "decode-0") > 0, "the router spreads requests over both"
    cluster.kill("decode-1")
    with cf.ThreadPoolExecutor(len(calls)) as pool:
        rests = list(pool.map(_collect, calls))
    outs = [first + rest for first, (rest, _) in zip(firsts, rests)]
    assert outs == reference, "the streams went on to the same tokens, none lost or repeated"
    assert all(end[0] == pb.LENGTH for _, end in rests)
    assert sum(end[1] for _, end in rests) > 0, "some requests were recomputed"
    stats = cluster.wait_idle()
    assert sorted(s.worker_id for s in stats) == ["decode-0", "prefill-0"]


def test_without_decode_workers_requests_fail_clearly_and_a_restarted_one_serves(cluster, reference):
    calls, _ = _start_decoding(cluster, PROMPTS[:2])
    cluster.kill("decode-0")  # the last one
    for call in calls:
        _, (code, details) = _collect(call)
        assert code == grpc.StatusCode.UNAVAILABLE and "no decode worker" in details, details
    _, (code, details) = _collect(cluster.stream(PROMPTS[0], 4))
    assert code == grpc.StatusCode.UNAVAILABLE and "no decode worker" in details
    cluster.start_worker("decode", "decode-0")
    cluster.start_worker("decode", "decode-1")
    cluster.wait_registered(1, 2)
    assert cluster.generate(PROMPTS[1], MAX_TOKENS)[0] == reference[1]
    cluster.wait_idle()
    # The restarted workers listen on new ports: the router keeps channels to the live ones only.
    assert len(cluster.registry.channels) == len(cluster.registry.workers()) == 3


def test_a_hung_decode_worker_is_quarantined_and_its_requests_recomputed(cluster, reference):
    calls, firsts = _start_decoding(cluster, PROMPTS)
    victim = cluster.workers["decode-1"]
    assert _on(cluster, "decode-1") > 0
    # On only now (its shapes compiled): a first compilation under load can take seconds. The
    # default threshold is 60 s; 4 s here.
    cluster.registry.hung_s = 4.0
    gate = threading.Event()
    victim.engine.post(lambda: gate.wait(30))  # the engine thread is stuck; gRPC and heartbeats carry on
    try:
        with cf.ThreadPoolExecutor(len(calls)) as pool:
            rests = list(pool.map(_collect, calls))
        outs = [first + rest for first, (rest, _) in zip(firsts, rests)]
        assert outs == reference
        assert sum(end[1] for _, end in rests) > 0
        hung = {w.id: w.hung for w in cluster.registry.workers()}
        assert hung == {"prefill-0": False, "decode-0": False, "decode-1": True}
        assert {s.worker_id: s.hung for s in cluster.registry.instances(timeout=1.0)}["decode-1"]  # Admin shows it
        # New requests avoid it.
        assert cluster.generate(PROMPTS[2], 8)[0] == reference[2][:8]
    finally:
        gate.set()
    deadline = time.monotonic() + 10
    while any(w.hung for w in cluster.registry.workers()):
        assert time.monotonic() < deadline, "decode-1 did not rejoin routing after it made progress"
        time.sleep(0.1)
    cluster.registry.hung_s = None
    stats = cluster.wait_idle()
    assert all(s.alive and not s.hung for s in stats)
