"""Fail-or-recompute across processes (slow: its own cluster): two TP1 prefill workers and one
TP2 decode worker started one role per process, as on separate hosts. Killing a prefill worker
mid-burst recomputes its requests on the other one; every request still gets the offline tokens
and no block leaks."""

import concurrent.futures as cf
import os
import time

import grpc
import pytest

import dsjax
from dsjax.engine.sampling_params import SamplingParams
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.supervisor import xla_flags_with_devices
from tests.support.serving import free_port, instances, launch_server, stop_server, wait_idle, wait_serving

CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")


@pytest.fixture(scope="module")
def roles(tmp_path_factory):
    logs = tmp_path_factory.mktemp("roles")
    port = free_port()
    router = f"localhost:{port}"
    common = ["--model", "tiny-llama", "--compilation-cache", CACHE_DIR, "--num-blocks", "128"]
    procs = [launch_server(["--role", "router", "--port", str(port), "--metrics-port", "-1", "--http-port", "0", *common], logs / "router.log")]
    for wid, role, tp in (("p0", "prefill", 1), ("p1", "prefill", 1), ("d0", "decode", 2)):
        env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(os.environ.get("XLA_FLAGS", ""), tp))
        procs.append(launch_server(["--role", role, "--router", router, "--worker-id", wid, f"--{role}-tp", str(tp), *common],
                                   logs / f"{wid}.log", env=env))
    try:
        wait_serving(router, timeout=150, proc=procs[0])
        deadline = time.monotonic() + 120
        while len(instances(router)) < 3:
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.2)
        yield router
    finally:
        for p in procs:
            stop_server(p)


@pytest.mark.slow
def test_prefill_worker_death_is_recomputed(roles):
    prompts = [[256] + [i + 1] * 200 for i in range(10)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = [o.token_ids for o in dsjax.LLM(model="tiny-llama", dummy_weights=True).generate(prompt_token_ids=prompts, sampling=sp)]
    victim = [s for s in instances(roles) if s.worker_id == "p0"][0]

    def run(p):
        with grpc.insecure_channel(roles) as ch:
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
            msgs = list(dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=60))
        return [t for m in msgs for t in m.token_ids], msgs[-1].breakdown.num_recomputes

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        futs = [pool.submit(run, p) for p in prompts]
        time.sleep(0.05)
        os.kill(victim.pid, 9)
        outs = [f.result() for f in futs]
    assert [ids for ids, _ in outs] == ref
    assert sum(n for _, n in outs) > 0, "no request was on the killed worker"
    stats = wait_idle(roles)
    assert sorted(s.worker_id for s in stats) == ["d0", "p1"]
