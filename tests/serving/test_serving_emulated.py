"""`python -m dsjax.serve --emulate PROFILE`: the real router, workers, scheduler and KV paths on
emulated devices (dsjax/runtime/emulated.py), in one process and as a cluster of processes."""

import concurrent.futures as cf
import json
from pathlib import Path

import grpc
import pytest

from models.config import PRESETS
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from tests.support.serving import free_port, launch_server, stop_server, wait_idle, wait_serving

# OPT-13B on A100-80GB (DistServe's TP1 fit, ms), for TP 1 and 2: no shared data needed.
COEFFS = {"prefill": [18.1, 0.1019, 7.12e-6], "decoding_smallbs": [19.93, 6.27e-4, 0.0385],
          "decoding_largebs": [7.17, 5.8e-4, 0.158], "decoding_large_small_bs_threshold": 95}
BLOCK_BYTES = PRESETS["opt-13b"].kv_bytes_per_token(2) * 16
LINK_GBPS = 100.0


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("emulated") / "a100.json"
    path.write_text(json.dumps({"facebook/opt-13b": {"1": COEFFS, "2": COEFFS}}))
    return str(path)


def serve(args, log, timeout=30):
    port = free_port()
    proc = launch_server(["--model", "opt-13b", "--port", str(port), "--http-port", "0", "--metrics-port", "-1",
                          "--emulate-link-gbps", str(LINK_GBPS), *args], log)
    try:
        wait_serving(f"localhost:{port}", timeout=timeout, proc=proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, f"localhost:{port}"


def generate(target, prompts_and_lengths):
    """Concurrent Generate calls -> (token ids, last message) per request."""
    def one(item):
        prompt, n = item
        with grpc.insecure_channel(target) as ch:
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=n))
            msgs = list(dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=30))
        return [t for m in msgs for t in m.token_ids], msgs[-1]

    with cf.ThreadPoolExecutor(len(prompts_and_lengths)) as pool:
        return list(pool.map(one, prompts_and_lengths))


def kv_bytes(prompt_len):
    return -(-prompt_len // 16) * BLOCK_BYTES  # the prompt's KV moves; decode writes the first token's


@pytest.fixture(scope="module")
def inprocess(profile, tmp_path_factory):
    proc, target = serve(["--emulate", profile, "--prefill-tp", "2"], tmp_path_factory.mktemp("emu-inproc") / "serve.log")
    yield target
    stop_server(proc)
    assert proc.returncode == 0


def test_inprocess_generate_end_to_end(inprocess):
    work = [([11 + i] * (30 + 40 * i), 5 + 3 * i) for i in range(4)]
    outs = generate(inprocess, work)
    for (prompt, n), (ids, last) in zip(work, outs):
        assert len(ids) == n and all(0 <= t < PRESETS["opt-13b"].vocab_size for t in ids)
        assert last.finish_reason == pb.LENGTH
        assert last.breakdown.kv_bytes == kv_bytes(len(prompt))  # the real model's bytes, not the placeholder's
        # prefill at least a batch's modelled time; decode (from the first decode step's end) a step a token
        assert last.breakdown.prefill_seconds >= (18.1 + 0.1019 * len(prompt)) * 1e-3 * 0.99
        assert last.breakdown.decode_seconds >= (n - 2) * 0.0199
    stats = wait_idle(inprocess)
    assert {s.worker_id: (s.tp, s.num_blocks > 4000) for s in stats} == {"prefill-0": (2, True), "decode-0": (1, True)}
    by_id = {s.worker_id: s for s in stats}
    assert by_id["prefill-0"].prefill_launches >= 1
    assert by_id["decode-0"].continued_steps >= max(n for _, n in work) - 2  # the longest request's, after its first


@pytest.fixture(scope="module")
def cluster(profile, tmp_path_factory):
    logs = tmp_path_factory.mktemp("emu-cluster")
    proc, target = serve(["--emulate", profile, "--workers", "processes", "--emulate-devices", "4", "--prefill-tp", "2",
                          "--decode-replicas", "2", "--log-dir", str(logs)], logs / "router.log", timeout=60)
    yield target, logs
    stop_server(proc)


def test_a_cluster_of_four_emulated_devices_moves_kv_over_grpc(cluster):
    target, logs = cluster
    work = [([100 + i] * (20 + 37 * i), 4 + i) for i in range(10)]
    outs = generate(target, work)
    for (prompt, n), (ids, last) in zip(work, outs):
        assert len(ids) == n and last.finish_reason == pb.LENGTH
        assert last.breakdown.kv_bytes == kv_bytes(len(prompt))  # pulled over gRPC as a placeholder
        assert last.breakdown.transfer_seconds >= kv_bytes(len(prompt)) / (LINK_GBPS * 1e9 / 8)
    stats = {s.worker_id: s for s in wait_idle(target)}
    assert {w: (s.tp, s.alive) for w, s in stats.items()} == {"prefill-0": (2, True), "decode-0": (1, True), "decode-1": (1, True)}
    assert stats["prefill-0"].num_blocks > 2 * stats["decode-0"].num_blocks > 8000  # TP2 holds the weights twice over
    assert sum(s.migrations for w, s in stats.items() if w.startswith("decode")) == len(work)
    assert stats["prefill-0"].kv_bytes == sum(s.kv_bytes for w, s in stats.items() if w.startswith("decode")) \
        == sum(kv_bytes(len(p)) for p, _ in work)
    # every worker reports its device's host-time counters (the emulated compare reads them)
    assert stats["prefill-0"].prefill_launches >= len(work) // 8 and stats["prefill-0"].continued_steps == 0
    assert sum(s.continued_steps for w, s in stats.items() if w.startswith("decode")) >= max(n for _, n in work) - 2
    assert all(s.host_gap_seconds >= 0 and s.prefill_host_gap_seconds >= 0 for s in stats.values())
    for name in ("prefill-0", "decode-0"):
        assert "attention backend emulated on emulated" in (logs / f"{name}.log").read_text()
    for s in stats.values():  # an emulated worker loads no jax (what lets dozens share a host)
        maps = Path(f"/proc/{s.pid}/maps")
        if maps.exists():
            assert "jaxlib" not in maps.read_text(), s.worker_id
