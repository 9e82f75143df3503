"""A real disaggregated cluster over loopback gRPC: the launcher starts a router, a TP2 prefill
worker and two TP1 decode workers as separate processes (KV moves TP2 -> TP1 over gRPC).

One cluster serves the whole module; the test that kills a worker runs last.
"""

import concurrent.futures as cf
import os
import threading
import time

import grpc
import numpy as np
import pytest

import dsjax
from dsjax.engine.sampling_params import SamplingParams
from serving.cluster_auth import with_token
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from tests.support.serving import free_port, instances, internal_channel, launch_server, stop_server, wait_idle, wait_serving

MAX_TOKENS = 10
LEASE_S = 3.0
CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster-logs")
    port = free_port()
    args = ["--workers", "processes", "--model", "tiny-llama", "--dummy-weights", "--port", str(port), "--metrics-port", "-1", "--http-port", "0",
            "--prefill-tp", "2", "--decode-replicas", "2", "--num-blocks", "160", "--lease-seconds", str(LEASE_S),
            "--compilation-cache", CACHE_DIR, "--log-dir", str(logs), "--max-tokens-limit", "400",
            "--max-prefill-inflight", "2"]  # most of the 32 concurrent streams wait in the router for a prefill slot
    proc = launch_server(args, logs / "router.log")
    target = f"localhost:{port}"
    try:
        wait_serving(target, timeout=150, proc=proc)
        with grpc.insecure_channel(target) as channel:
            yield target, channel, logs
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def llm():
    return dsjax.LLM(model="tiny-llama", dummy_weights=True, dtype="float32", num_blocks=160)


def stream(channel, request, timeout=60.0):
    """-> (token ids, text, finish reason, messages)."""
    ids, text, msgs = [], "", []
    for m in dsjax_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout):
        ids += m.token_ids
        text += m.text
        msgs.append(m)
    return ids, text, msgs[-1].finish_reason, msgs


def greedy(max_tokens=MAX_TOKENS, **kw):
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_32_concurrent_streams_match_offline(cluster, llm):
    _, channel, _ = cluster
    rng = np.random.default_rng(0)
    token_prompts = [[int(t) for t in rng.integers(0, 500, n)] for n in rng.integers(3, 60, 24)]
    text_prompts = ["Hello", "The quick brown fox", "disaggregated serving ü", "a" * 40, "KV cache", "prefill", "decode", "1 2 3"]
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    ref = llm.generate(prompt_token_ids=token_prompts, sampling=sp) + llm.generate(text_prompts, sampling=sp)
    requests = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=greedy()) for p in token_prompts]
    requests += [pb.GenerateRequest(text=t, sampling=greedy()) for t in text_prompts]
    start = threading.Barrier(len(requests))

    def run(req):
        start.wait()
        return stream(channel, req)

    with cf.ThreadPoolExecutor(len(requests)) as pool:
        outs = list(pool.map(run, requests))
    for i, ((ids, text, reason, msgs), r) in enumerate(zip(outs, ref)):
        assert ids == r.token_ids
        if i >= len(token_prompts):  # random weights emit broken UTF-8: U+FFFD counts depend on context
            assert text.replace("\ufffd", "") == r.text.replace("\ufffd", "")
        assert reason == pb.LENGTH
        assert msgs[-1].timing.first_token_time >= msgs[-1].timing.arrival_time > 0
    assert any(m.breakdown.kv_bytes > 0 for *_, msgs in outs for m in msgs[-1:])  # KV moved over gRPC
    stats = wait_idle(cluster[0])
    assert {s.worker_id: s.tp for s in stats} == {"prefill-0": 2, "decode-0": 1, "decode-1": 1}
    assert all(s.migrations > 0 for s in stats), "both decode workers took requests"


def test_eos_and_stop(cluster, llm):
    _, channel, _ = cluster
    prompt = [256, 1, 2, 3]
    ref = llm.generate(prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    stop_id = ref.token_ids[3]
    ids, _, reason, _ = stream(channel, pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=greedy(8, stop_token_ids=[stop_id])))
    assert reason == pb.STOP and ids == ref.token_ids[: ref.token_ids.index(stop_id) + 1]
    one, _, reason, _ = stream(channel, pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=greedy(1)))
    assert reason == pb.LENGTH and one == ref.token_ids[:1]  # finished on the prefill worker
    wait_idle(cluster[0])


def test_cancel_mid_stream_frees_every_block(cluster):
    target, channel, _ = cluster
    stub = dsjax_pb2_grpc.GenerationStub(channel)
    rng = np.random.default_rng(1)
    calls = []
    for i in range(12):
        prompt = [int(t) for t in rng.integers(0, 500, int(rng.integers(4, 90)))]
        calls.append(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=greedy(300))))
    # Cancel at different points: before the first token, after it (KV held or moving), mid-decode.
    for i, call in enumerate(calls):
        for _ in range(i % 4 * 3):
            next(call)
        call.cancel()
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    # A deadline that expires mid-stream also frees everything (400 tokens of the tiny model take
    # ~0.5 s with overlapped decode steps: a 0.15-s deadline ends the stream well before).
    with pytest.raises(grpc.RpcError) as e:
        stream(channel, pb.GenerateRequest(text="deadline", sampling=greedy(400)), timeout=0.15)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(target)


BAD = {
    "empty text": (pb.GenerateRequest(text="", sampling=greedy()), "prompt"),
    "no prompt": (pb.GenerateRequest(sampling=greedy()), "prompt"),
    "empty token ids": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[]), sampling=greedy()), "prompt"),
    "over the context": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 512), sampling=greedy()), "context"),
    "max_tokens 0": (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens"),
    "max_tokens < 0": (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(max_tokens=-3)), "max_tokens"),
    "max_tokens over the limit": (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(max_tokens=401)), "max_tokens"),
    "temperature < 0": (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(temperature=-0.5)), "temperature"),
    "top_p 0": (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
    "top_p > 1": (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    "top_k < 0": (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_k=-1)), "top_k"),
    "token id over vocab": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 512]), sampling=greedy()), "vocabulary"),
    "negative token id": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1]), sampling=greedy()), "vocabulary"),
    "too large": (pb.GenerateRequest(text="x" * (1 << 20), sampling=greedy()), "message limit"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_invalid_argument(cluster, case):
    request, field = BAD[case]
    with pytest.raises(grpc.RpcError) as e:
        stream(cluster[1], request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_unpulled_kv_lease_expires(cluster):
    """KV prefilled but never pulled is freed when its lease runs out; a late pull is NOT_FOUND."""
    target = cluster[0]
    (prefill,) = [s for s in instances(target) if s.role == wpb.PREFILL]
    with internal_channel(prefill.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        req = wpb.WorkerRequest(request_id="orphan#0", prompt_token_ids=list(range(1, 40)), seed=0,
                                sampling=pb.SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0))
        resp = stub.Prefill(wpb.PrefillRequest(request=req), timeout=30)
        assert resp.kv.num_tokens == 39 and resp.lease_ms == LEASE_S * 1000
        held = [s for s in instances(target) if s.role == wpb.PREFILL][0]
        assert held.held == 1 and held.free_blocks == held.num_blocks - 3
        time.sleep(LEASE_S + 0.5)
        after = wait_idle(target)
        assert [s.leases_expired for s in after if s.role == wpb.PREFILL] == [held.leases_expired + 1]
        with pytest.raises(grpc.RpcError) as e:
            list(stub.PullKV(wpb.PullKVRequest(request_id="orphan#0"), timeout=10))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_killing_a_decode_worker(cluster, llm):
    """Its requests are prefilled again from their tokens so far and finish on the other decode
    worker (each stream goes on to the offline tokens, none lost or repeated), new requests
    succeed, and the restarted worker rejoins."""
    target, channel, _ = cluster
    stub = dsjax_pb2_grpc.GenerationStub(channel)
    victim = [s for s in instances(target) if s.worker_id == "decode-1"][0]
    prompts = [[256, i + 1] for i in range(8)]
    long = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    expect = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling=long)]
    calls = [stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=greedy(300)), timeout=60) for p in prompts]
    firsts = [next(c) for c in calls] + [next(c) for c in calls]  # every request is decoding
    assert all(m.token_ids for m in firsts)
    os.kill(victim.pid, 9)
    outs, recomputes = [], 0
    for i, c in enumerate(calls):
        msgs = [firsts[i], firsts[i + len(calls)]] + list(c)
        outs.append([t for m in msgs for t in m.token_ids])
        assert msgs[-1].finish_reason == pb.LENGTH
        recomputes += msgs[-1].breakdown.num_recomputes
    assert outs == expect
    assert recomputes > 0, "some requests were on the killed worker"
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    ref = llm.generate(prompt_token_ids=[[256, 7, 7]], sampling=sp)[0].token_ids
    for _ in range(3):  # served by the surviving decode worker
        assert stream(channel, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[256, 7, 7]), sampling=greedy()))[0] == ref
    deadline = time.monotonic() + 90
    while True:  # the launcher restarts it; it registers again under the same id
        back = [s for s in instances(target) if s.worker_id == "decode-1" and s.alive and s.pid != victim.pid]
        if back:
            break
        assert time.monotonic() < deadline, "decode-1 did not rejoin"
        time.sleep(0.5)
    wait_idle(target)


def test_internal_services_refuse_callers_without_the_cluster_token(cluster):
    """A stranger who reaches the ports can neither register a worker, nor pull, renew or release
    KV, nor drive a worker, nor read stats; the cluster serves on, correctly, afterwards."""
    target, channel, _ = cluster
    before = instances(target)
    prefill = next(s for s in before if s.role == wpb.PREFILL)
    decode = next(s for s in before if s.role == wpb.DECODE)
    req = wpb.WorkerRequest(request_id="intruder#0", prompt_token_ids=[1, 2, 3], seed=0,
                            sampling=pb.SamplingParams(max_tokens=2, temperature=0.0, top_p=1.0))
    forged = wpb.WorkerInfo(worker_id=decode.worker_id, role=wpb.DECODE, address="127.0.0.1:1", pid=1, tp=1, pp=1,
                            model="tiny-llama", block_size=16)
    calls = {
        "Register": lambda ch: worker_pb2_grpc.RegistryStub(ch).Register(forged, timeout=10),
        "Heartbeat": lambda ch: worker_pb2_grpc.RegistryStub(ch).Heartbeat(wpb.HeartbeatRequest(worker_id=decode.worker_id), timeout=10),
        "Admin": lambda ch: worker_pb2_grpc.AdminStub(ch).Instances(wpb.InstancesRequest(), timeout=10),
    }
    worker_calls = {
        "Prefill": (prefill.address, lambda ch: worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(wpb.PrefillRequest(request=req), timeout=10)),
        "PullKV": (prefill.address, lambda ch: list(worker_pb2_grpc.PrefillWorkerStub(ch).PullKV(wpb.PullKVRequest(request_id="x#0"), timeout=10))),
        "RenewLease": (prefill.address, lambda ch: worker_pb2_grpc.PrefillWorkerStub(ch).RenewLease(wpb.LeaseRequest(request_ids=["x#0"]), timeout=10)),
        "ReleaseKV": (prefill.address, lambda ch: worker_pb2_grpc.PrefillWorkerStub(ch).ReleaseKV(wpb.LeaseRequest(request_ids=["x#0"]), timeout=10)),
        "Decode": (decode.address, lambda ch: list(worker_pb2_grpc.DecodeWorkerStub(ch).Decode(
            wpb.DecodeRequest(request=req, source=wpb.KVSource(address="127.0.0.1:1")), timeout=10))),
        "Stats": (decode.address, lambda ch: worker_pb2_grpc.WorkerStub(ch).Stats(wpb.StatsRequest(), timeout=10)),
    }
    targets = [(name, target, call) for name, call in calls.items()] + [(n, a, c) for n, (a, c) in worker_calls.items()]
    for name, address, call in targets:
        for token in (None, "guessed"):
            with with_token(grpc.insecure_channel(address), token) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    call(ch)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, e.value)
                assert "cluster token" in e.value.details()
    after = instances(target)
    assert [(s.worker_id, s.address, s.pid) for s in after] == [(s.worker_id, s.address, s.pid) for s in before]
    ids, _, reason, _ = stream(channel, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                                         sampling=pb.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)))
    assert len(ids) == 5 and reason == pb.LENGTH
    wait_idle(target)
