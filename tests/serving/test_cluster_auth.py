"""The cluster token on a router in this process (a fake backend): internal services refuse
callers without it, the public ones do not ask for it, and `--role` processes need one."""

import os
import subprocess
import sys

import grpc
import pytest

from models.config import PRESETS
from models.tokenizer import ByteTokenizer
from serving.cluster_auth import TOKEN_ENV, cluster_token, with_token
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc, worker_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.registry import Registry
from serving.router import RouterServer
from tests.support.serving import REPO, FakeBackend, free_port

CONFIG = PRESETS["tiny-llama"]


@pytest.fixture
def router():
    registry = Registry(cluster_token="right")
    server = RouterServer(FakeBackend(), ByteTokenizer(CONFIG.vocab_size), CONFIG, port=free_port(), cluster_token="right",
                          extra_servicers=[(worker_pb2_grpc.add_RegistryServicer_to_server, registry)]).start()
    yield f"127.0.0.1:{server.port}", registry
    server.stop()
    registry.close()


@pytest.mark.parametrize("token", [None, "wrong", "righ", "right-but-longer"])
def test_internal_calls_without_the_token_are_refused(router, token):
    target, registry = router
    with with_token(grpc.insecure_channel(target), token) as ch:
        for call in (lambda: worker_pb2_grpc.AdminStub(ch).Instances(wpb.InstancesRequest(), timeout=5),
                     lambda: worker_pb2_grpc.RegistryStub(ch).Register(wpb.WorkerInfo(worker_id="decode-0", role=wpb.DECODE,
                                                                                       address="127.0.0.1:1"), timeout=5)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert registry.workers() == []  # nothing registered


def test_the_token_opens_internal_calls_and_the_public_api_needs_none(router):
    target, _ = router
    with with_token(grpc.insecure_channel(target), "right") as ch:
        assert len(worker_pb2_grpc.AdminStub(ch).Instances(wpb.InstancesRequest(), timeout=5).instances) == 1
    with grpc.insecure_channel(target) as ch:
        msgs = list(dsjax_pb2_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=3)), timeout=10))
        assert sum(len(m.token_ids) for m in msgs) == 3


def test_token_from_the_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=TOKEN_ENV):
        cluster_token()
    made = cluster_token(create=True)
    assert len(made) >= 40 and os.environ[TOKEN_ENV] == made and cluster_token() == made


def test_hand_started_roles_refuse_to_run_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    for role in (["--role", "router"], ["--role", "decode", "--router", "127.0.0.1:1"]):
        out = subprocess.run([sys.executable, "-m", "dsjax.serve", *role, "--port", "0", "--http-port", "0", "--metrics-port", "-1"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and TOKEN_ENV in out.stderr, (role, out.stderr[-500:])


def _info(**kw) -> wpb.WorkerInfo:
    base = {"worker_id": "decode-0", "role": wpb.DECODE, "address": "127.0.0.1:1", "pid": 10, "tp": 1, "pp": 1,
            "model": "tiny-llama", "block_size": 16}
    return wpb.WorkerInfo(**{**base, **kw})


def test_registration_checks_the_cluster_fingerprint():
    registry = Registry(cluster_token="right", model="tiny-llama", block_size=16)
    server = RouterServer(FakeBackend(), ByteTokenizer(CONFIG.vocab_size), CONFIG, port=free_port(), cluster_token="right",
                          extra_servicers=[(worker_pb2_grpc.add_RegistryServicer_to_server, registry)]).start()
    try:
        with with_token(grpc.insecure_channel(f"127.0.0.1:{server.port}"), "right") as ch:
            stub = worker_pb2_grpc.RegistryStub(ch)
            for bad, needle in ((_info(model="llama-3-8b"), "model='llama-3-8b'"), (_info(block_size=32), "block_size=32")):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Register(bad, timeout=5)
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and needle in e.value.details()
            assert registry.workers() == []
            assert stub.Register(_info(), timeout=5).heartbeat_seconds > 0
            assert [w.id for w in registry.workers()] == ["decode-0"]
    finally:
        server.stop()
        registry.close()


class _Call:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def test_registering_again_keeps_calls_a_new_process_cancels_them():
    registry = Registry()
    try:
        registry.add(_info())
        (entry,) = registry.workers()
        call = _Call()
        entry.calls.add(call)
        registry.add(_info())  # the same process again (e.g. after a missed heartbeat)
        assert registry.workers() == [entry] and not call.cancelled
        registry.add(_info(pid=11))  # a restarted worker under the same id
        assert call.cancelled and registry.workers()[0].info.pid == 11
    finally:
        registry.close()


def test_requests_go_to_the_worker_with_the_least_kv_load():
    """The router balances as the in-process engines and the simulator do: by the tokens it has
    on each worker (not by how many requests), ties by requests in flight, then by id."""
    registry = Registry()
    try:
        for i in range(2):
            registry.add(_info(worker_id=f"decode-{i}", address=f"127.0.0.1:{i + 1}"))
        a = registry.acquire(wpb.DECODE, 2000)  # one long request on decode-0
        assert a.id == "decode-0"
        picks = [registry.acquire(wpb.DECODE, 300).id for _ in range(6)]  # short ones fill decode-1 up to it
        assert picks == ["decode-1"] * 6 and a.load == 2000
        assert registry.acquire(wpb.DECODE, 300).id == "decode-1"  # 1800 < 2000
        assert registry.acquire(wpb.DECODE, 300).id == "decode-0"  # 2100 > 2000
        registry.release(a, 2000)
        assert a.load == 300 and a.inflight == 1
        assert registry.acquire(wpb.PREFILL, 10) is None
    finally:
        registry.close()
