"""A router that dies and comes back: one role per process (router, prefill worker, decode
worker, started by hand as on separate hosts). The router is SIGKILLed mid-stream and started
again on the same port; the workers (the same processes) register with the new router within a
heartbeat, new requests get the same tokens as before, and the request cut off by the crash left
no KV behind on the workers."""

import os
import signal
import time

import grpc

from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from tests.support.serving import free_port, instances, launch_server, stop_server, wait_idle, wait_serving

CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")
PROMPT = [256, 11, 12, 13]


def _generate(target: str, max_tokens: int = 12) -> list[int]:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(target) as ch:
        return [t for m in dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=60) for t in m.token_ids]


def _registered(target: str, timeout: float = 60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stats = {s.worker_id: s.pid for s in instances(target) if s.alive}
        if len(stats) == 2:
            return stats
        assert time.monotonic() < deadline, f"workers did not register: {stats}"
        time.sleep(0.2)


def test_workers_rejoin_a_restarted_router(tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    common = ["--model", "tiny-llama", "--compilation-cache", CACHE_DIR, "--num-blocks", "64", "--lease-seconds", "2"]
    router_argv = ["--role", "router", "--port", str(port), "--metrics-port", "-1", "--http-port", "0", *common]
    procs = [launch_server(router_argv, tmp_path / "router-1.log")]
    for wid, role in (("p0", "prefill"), ("d0", "decode")):
        procs.append(launch_server(["--role", role, "--router", target, "--worker-id", wid, *common], tmp_path / f"{wid}.log"))
    try:
        wait_serving(target, timeout=150, proc=procs[0])
        before = _registered(target)
        expect = _generate(target)
        assert len(expect) == 12
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT),
                                 sampling=pb.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
        with grpc.insecure_channel(target) as ch:
            call = dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=60)
            next(call), next(call)  # decoding on d0 when the router dies
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait(10)
            try:
                list(call)
                raise AssertionError("the stream outlived its router")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
        started = time.monotonic()
        procs[0] = launch_server(router_argv, tmp_path / "router-2.log")
        wait_serving(target, timeout=60, proc=procs[0])
        assert _registered(target) == before, "the same worker processes rejoined"
        assert time.monotonic() - started < 30
        assert _generate(target) == expect
        wait_idle(target, timeout=15)  # the cut-off request's KV: freed (decode: its call died; prefill: lease)
    finally:
        for p in procs:
            stop_server(p)
