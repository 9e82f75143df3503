"""Colocated and chunked replicas as worker processes behind the router (`--mode colocated
--workers processes`): the same tokens as the offline engine, requests spread by KV load, a
cancel frees every block, and a killed replica's requests go on from their tokens so far on the
other one. Real processes over loopback gRPC; the test that kills a replica runs last."""

import concurrent.futures as cf
import os
import time

import grpc
import numpy as np
import pytest

import dsjax
from dsjax.engine.sampling_params import SamplingParams
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from tests.support.serving import free_port, instances, launch_server, stop_server, wait_idle, wait_serving

MAX_TOKENS = 10
CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")


@pytest.fixture(scope="module", params=["colocated", "chunked"])
def cluster(request, tmp_path_factory):
    logs = tmp_path_factory.mktemp(f"replicas-{request.param}")
    port = free_port()
    args = ["--mode", request.param, "--workers", "processes", "--model", "tiny-llama", "--dummy-weights",
            "--port", str(port), "--metrics-port", "-1", "--http-port", "0", "--prefill-replicas", "2",
            "--num-blocks", "160", "--compilation-cache", CACHE_DIR, "--log-dir", str(logs), "--max-tokens-limit", "400"]
    proc = launch_server(args, logs / "router.log")
    target = f"localhost:{port}"
    try:
        wait_serving(target, timeout=150, proc=proc)
        with grpc.insecure_channel(target) as channel:
            yield target, channel
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def llm():
    return dsjax.LLM(model="tiny-llama", dummy_weights=True, dtype="float32", num_blocks=160, mode="colocated")


def greedy(max_tokens=MAX_TOKENS):
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def stream(channel, request, timeout=60.0):
    msgs = list(dsjax_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout))
    return [t for m in msgs for t in m.token_ids], msgs


def test_concurrent_streams_match_offline_on_both_replicas(cluster, llm):
    target, channel = cluster
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 500, n)] for n in rng.integers(3, 60, 16)]
    ref = llm.generate(prompt_token_ids=prompts, sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=greedy()) for p in prompts]
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        outs = list(pool.map(lambda r: stream(channel, r), reqs))
    for (ids, msgs), r in zip(outs, ref):
        assert ids == r.token_ids and msgs[-1].finish_reason == pb.LENGTH
        assert msgs[-1].breakdown.prefill_seconds > 0  # the replica's timing reached the client
    stats = wait_idle(target)
    assert sorted(s.worker_id for s in stats) == ["replica-0", "replica-1"]
    assert all(s.role == wpb.COLOCATED and s.pid != os.getpid() for s in stats)


def test_cancel_mid_stream_frees_every_block(cluster):
    target, channel = cluster
    stub = dsjax_pb2_grpc.GenerationStub(channel)
    calls = [stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5 + i] * (4 + 7 * i)), sampling=greedy(300)))
             for i in range(8)]
    for i, call in enumerate(calls):
        for _ in range(i % 3 * 2):
            next(call)
        call.cancel()
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    wait_idle(target)


def test_killing_a_replica_recomputes_its_requests_on_the_other(cluster, llm):
    target, channel = cluster
    stub = dsjax_pb2_grpc.GenerationStub(channel)
    wait_idle(target)  # the router counts nothing left from the cancels: the six spread 3 + 3
    victim = [s for s in instances(target) if s.worker_id == "replica-1"][0]
    prompts = [[256, i + 1] for i in range(6)]
    expect = [o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                sampling=SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))]
    calls = [stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=greedy(400)), timeout=60) for p in prompts]
    # Every request has its first token, so it is decoding on its replica (a colocated replica
    # prefills and decodes it): kill one now, while 400-token requests of a tiny model still run.
    firsts = [next(c) for c in calls]
    on_victim = [s for s in instances(target) if s.worker_id == "replica-1"][0]
    assert on_victim.routed == 3 and on_victim.running > 0, on_victim  # still decoding when it dies
    os.kill(victim.pid, 9)
    outs, recomputes = [], 0
    for i, c in enumerate(calls):
        msgs = [firsts[i]] + list(c)
        outs.append([t for m in msgs for t in m.token_ids])
        assert msgs[-1].finish_reason == pb.LENGTH
        recomputes += msgs[-1].breakdown.num_recomputes
    assert outs == expect  # none lost or repeated
    assert recomputes > 0, "some requests were on the killed replica"
    deadline = time.monotonic() + 90
    while not [s for s in instances(target) if s.worker_id == "replica-1" and s.alive and s.pid != victim.pid]:
        assert time.monotonic() < deadline, "replica-1 did not rejoin"
        time.sleep(0.5)
    wait_idle(target)
