"""Workers check every internal request (serving/worker_checks.py): over real loopback gRPC, with
the cluster token, a malformed Prefill, Decode, PullKV, RenewLease or ReleaseKV gets
INVALID_ARGUMENT naming the field, an oversized message RESOURCE_EXHAUSTED, a Decode naming a KV
source the router does not list is refused before anything is dialled, renewals cannot keep a
lease past its maximum; and the workers keep serving correct tokens throughout."""

import time

import grpc
import pytest

from serving.leases import LeaseTable
from serving.messages import worker_request
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.worker_checks import MAX_IDS_PER_CALL
from dsjax.engine.sampling_params import SamplingParams
from tests.support.local_cluster import LocalCluster

SP = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(prefill=1, decode=1, lease_s=0.6, max_lease_s=1.5) as c:
        yield c


def _req(rid="r#0", prompt=(256, 1, 2, 3), output=(), **sampling) -> wpb.WorkerRequest:
    msg = worker_request(rid, list(prompt), list(output), SP, 0, ())
    for k, v in sampling.items():
        setattr(msg.sampling, k, v)
    return msg


def _bad(call, field: str, code=grpc.StatusCode.INVALID_ARGUMENT) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value
    assert field in e.value.details(), e.value.details()


PREFILL_CASES = {
    "empty id": (_req(rid=""), "request.request_id"),
    "long id": (_req(rid="x" * 300), "request.request_id"),
    "unprintable id": (_req(rid="a\nb"), "request.request_id"),
    "empty prompt": (_req(prompt=()), "request.prompt_token_ids"),
    "over the context": (_req(prompt=[1] * 600), "context"),
    "outside the vocabulary": (_req(prompt=[1, 512]), "request.prompt_token_ids"),
    "output outside the vocabulary": (_req(output=[-4]), "request.output_token_ids"),
    "max_tokens 0": (_req(max_tokens=0), "max_tokens"),
    "negative temperature": (_req(temperature=-1.0), "temperature"),
    "max_tokens past the context": (_req(prompt=[1] * 500, max_tokens=20), "request.sampling.max_tokens"),
    "already finished": (_req(output=[5] * 8), "request.output_token_ids"),
}


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_refuses_malformed_requests(cluster, case):
    msg, field = PREFILL_CASES[case]
    stub = worker_pb2_grpc.PrefillWorkerStub(cluster.worker_channel("prefill-0"))
    _bad(lambda: stub.Prefill(wpb.PrefillRequest(request=msg), timeout=10), field)


def test_lease_calls_and_pulls_refuse_malformed_ids(cluster):
    stub = worker_pb2_grpc.PrefillWorkerStub(cluster.worker_channel("prefill-0"))
    for call in (stub.RenewLease, stub.ReleaseKV):
        _bad(lambda: call(wpb.LeaseRequest(request_ids=["ok", ""]), timeout=10), "request_ids[1]")
        too_many = [f"r{i}" for i in range(MAX_IDS_PER_CALL + 1)]
        _bad(lambda: call(wpb.LeaseRequest(request_ids=too_many), timeout=10), "request_ids")
    _bad(lambda: list(stub.PullKV(wpb.PullKVRequest(request_id="r#0", max_chunk_bytes=-1), timeout=10)), "max_chunk_bytes")
    _bad(lambda: list(stub.PullKV(wpb.PullKVRequest(request_id="y" * 257), timeout=10)), "request_id")


def test_messages_over_the_workers_limit_are_refused(cluster):
    """The limit follows the real messages (a request of a whole context, one KV chunk), not 256 MiB."""
    w = cluster.workers["prefill-0"]
    assert w.engine.limits.message_bytes() < 2 << 20
    stub = worker_pb2_grpc.PrefillWorkerStub(cluster.worker_channel("prefill-0"))
    huge = _req(rid="z" * (3 << 20))
    _bad(lambda: stub.Prefill(wpb.PrefillRequest(request=huge), timeout=10), "", grpc.StatusCode.RESOURCE_EXHAUSTED)


def _prefilled(cluster, rid: str, prompt=(256, 9, 8, 7, 6)) -> tuple[wpb.WorkerRequest, wpb.PrefillResponse]:
    stub = worker_pb2_grpc.PrefillWorkerStub(cluster.worker_channel("prefill-0"))
    resp = stub.Prefill(wpb.PrefillRequest(request=_req(rid, prompt)), timeout=30)
    return _req(rid, prompt, [resp.token_id]), resp


def test_decode_refuses_bad_sources_and_requests(cluster):
    decode = worker_pb2_grpc.DecodeWorkerStub(cluster.worker_channel("decode-0"))
    prefill = cluster.workers["prefill-0"]
    req, resp = _prefilled(cluster, "dec#0")
    good = wpb.KVSource(worker_id="prefill-0", address=prefill.address, kv=resp.kv, lease_ms=resp.lease_ms)

    def decode_with(request=req, **source):
        src = wpb.KVSource()
        src.CopyFrom(good)
        for k, v in source.items():
            if k == "kv":
                src.kv.CopyFrom(v)
            else:
                setattr(src, k, v)
        return lambda: list(decode.Decode(wpb.DecodeRequest(request=request, source=src), timeout=20))

    # An address the router does not list: refused without a connection (the token never leaves).
    started = time.monotonic()
    _bad(decode_with(address="127.0.0.1:1"), "source.address")
    assert time.monotonic() - started < 10
    kv = wpb.KVDescriptor()
    kv.CopyFrom(resp.kv)
    kv.num_tokens += 5
    _bad(decode_with(kv=kv), "source.kv.num_tokens")
    kv.CopyFrom(resp.kv)
    kv.block_size = 1 << 20
    _bad(decode_with(kv=kv), "source.kv.block_size")
    _bad(decode_with(lease_ms=-1), "source.lease_ms")
    _bad(decode_with(request=_req("dec#0", (256, 9, 8, 7, 6))), "request.output_token_ids")
    _bad(decode_with(request=_req("", (256, 9, 8, 7, 6), [resp.token_id])), "request.request_id")
    # A well-formed request decodes from the listed prefill worker (prefilled again: the lease is short).
    req, resp = _prefilled(cluster, "dec#1")
    good.kv.CopyFrom(resp.kv)
    out = [m for m in decode_with(request=req)()]
    tokens = [resp.token_id] + [t for m in out for t in m.token_ids]
    assert len(tokens) == SP.max_tokens and out[-1].finish_reason == pb.LENGTH
    ids, _ = cluster.generate([256, 9, 8, 7, 6], SP.max_tokens)
    assert ids == tokens
    cluster.wait_idle()


def test_renewals_cannot_hold_a_lease_past_its_maximum(cluster):
    stub = worker_pb2_grpc.PrefillWorkerStub(cluster.worker_channel("prefill-0"))
    _, resp = _prefilled(cluster, "held#0")
    start = time.monotonic()
    renewed = []
    while time.monotonic() - start < 3.0:  # lease 0.6 s, at most 1.5 s in all
        unknown = stub.RenewLease(wpb.LeaseRequest(request_ids=["held#0"]), timeout=10).unknown_ids
        renewed.append((time.monotonic() - start, not unknown))
        if unknown:
            break
        time.sleep(0.2)
    held_for = max(t for t, ok in renewed if ok)
    assert renewed[-1][1] is False and 0.9 < held_for < 1.6, renewed
    _bad(lambda: list(stub.PullKV(wpb.PullKVRequest(request_id="held#0"), timeout=10)), "held#0", grpc.StatusCode.NOT_FOUND)
    cluster.wait_idle()


def test_lease_table_caps_renewals():
    now = [0.0]
    leases = LeaseTable(2.0, clock=lambda: now[0], max_hold_s=5.0)
    leases.hold("a", 1)
    for t in (1.5, 3.0, 4.5):
        now[0] = t
        assert leases.renew("a")
    now[0] = 5.0
    assert not leases.renew("a") and leases.pop_expired() == [("a", 1)]
    with pytest.raises(ValueError):
        LeaseTable(2.0, max_hold_s=1.0)


def test_registration_refuses_malformed_workers(cluster):
    stub = worker_pb2_grpc.RegistryStub(cluster.registry.channels.get(cluster.cluster_target))
    for info, field in ((wpb.WorkerInfo(worker_id="", role=wpb.DECODE, address="127.0.0.1:5"), "worker_id"),
                        (wpb.WorkerInfo(worker_id="d9", role=wpb.DECODE, address=""), "address"),
                        (wpb.WorkerInfo(worker_id="d9", role=wpb.ROLE_UNSPECIFIED, address="127.0.0.1:5"), "role")):
        _bad(lambda: stub.Register(info, timeout=10), field)
    replica = wpb.WorkerInfo(worker_id="d9", role=wpb.COLOCATED, address="127.0.0.1:5")  # not in a disaggregated cluster
    _bad(lambda: stub.Register(replica, timeout=10), "role=COLOCATED", grpc.StatusCode.FAILED_PRECONDITION)
    assert sorted(w.id for w in cluster.registry.workers()) == ["decode-0", "prefill-0"]
