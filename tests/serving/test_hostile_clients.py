"""Hostile clients against a real cluster (issue #15): `python -m dsjax.serve --workers processes`
launched with its defaults (no --host; the launcher's cluster token, here the tests' one, which the
workers inherit), a prefill and a decode worker as separate processes, all over loopback.

- every TCP listener of the router and of each worker (gRPC public and cluster ports, the HTTP API,
  metrics) is bound to loopback;
- a stranger (no token, a guessed one) is refused UNAUTHENTICATED by Register, Heartbeat, Admin,
  Prefill, PullKV, RenewLease, ReleaseKV, Decode and Stats, on every port that serves them;
- a forged registration of "decode-0" at a stranger's address is refused (and a member's with
  another fingerprint FAILED_PRECONDITION); the cluster serves on as before, nobody dials the stranger;
- a Decode with the token but a KV source the router does not list is refused before anything is
  dialled;
- malformed public (gRPC and HTTP) and internal messages each get a specific status whose
  message names the field;
- afterwards: the same greedy tokens as the first request, the same worker processes, every
  block free, and no traceback in any log.

One cluster serves the module (about 30 s to start on 2 shared cores); the tests run in order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import grpc
import pytest

from models.config import PRESETS
from serving.cluster_auth import TOKEN_ENV, with_token
from serving.fingerprint import weights_fingerprint
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc as wgrpc
from serving.worker_checks import MAX_IDS_PER_CALL, MAX_LEASE_MS
from tests.support.hostile import (Bait, cmdline, descendants, field, flag, http, is_loopback, listening_sockets,
                                   raw_call)
from tests.support.serving import free_port, instances, internal_channel, launch_server, stop_server, wait_idle, wait_serving

CONFIG = PRESETS["tiny-llama"]
MAX_LEN = 128  # --max-model-len: the workers' context
BLOCK = 16
CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")
PROMPT = [256, 17, 42, 7, 99]
GREEDY = pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
UNAUTH, INVALID = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT


@dataclasses.dataclass
class Cluster:
    proc: object
    port: int  # the public gRPC port
    cluster_port: int  # the router's own listener for cluster members (what the workers dial)
    http_port: int
    metrics_port: int
    channel: grpc.Channel
    workers: dict  # worker_id -> InstanceStats at start
    baseline: list  # the first request's greedy tokens
    logs: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cluster_target(self) -> str:
        return f"127.0.0.1:{self.cluster_port}"

    def address(self, worker_id: str) -> str:
        return self.workers[worker_id].address


def generate(channel, request=None) -> list[int]:
    request = request or pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=GREEDY)
    msgs = list(dsjax_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
    assert msgs[-1].finish_reason == pb.LENGTH
    return [t for m in msgs for t in m.token_ids]


def membership(c: Cluster) -> list[tuple]:
    return [(s.worker_id, s.address, s.pid, s.alive, s.hung) for s in instances(c.cluster_target)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("hostile")
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    args = ["--workers", "processes", "--model", "tiny-llama", "--dummy-weights", "--port", str(port),
            "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--max-model-len", str(MAX_LEN),
            "--num-blocks", "64", "--block-size", str(BLOCK), "--lease-seconds", "5", "--compilation-cache", CACHE_DIR,
            "--log-dir", str(logs)]
    proc = launch_server(args, logs / "router.log")
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=150, proc=proc)
        workers = {s.worker_id: s for s in instances(f"127.0.0.1:{port}")}
        assert sorted(workers) == ["decode-0", "prefill-0"]
        router = flag(cmdline(workers["decode-0"].pid), "--router")  # the launcher tells its workers the cluster port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Cluster(proc, port, int(router.rsplit(":", 1)[1]), http_port, metrics_port, channel, workers,
                          generate(channel), logs)
    finally:
        stop_server(proc)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


# ---- listeners ------------------------------------------------------------------------------------
def test_every_listener_is_on_loopback(cluster):
    pids = [cluster.proc.pid, *descendants(cluster.proc.pid)]
    assert {s.pid for s in cluster.workers.values()} <= set(pids)
    listeners = {pid: listening_sockets(pid) for pid in pids}
    exposed = {pid: [f"{a}:{p}" for a, p in socks if not is_loopback(a)] for pid, socks in listeners.items()}
    assert not any(exposed.values()), exposed
    # The router listens on exactly its public gRPC port, its cluster port, the HTTP API and metrics.
    assert {p for _, p in listeners[cluster.proc.pid]} == {cluster.port, cluster.cluster_port, cluster.http_port,
                                                           cluster.metrics_port}
    for s in cluster.workers.values():  # each worker on its one advertised port, advertised as loopback
        host, port = s.address.rsplit(":", 1)
        assert host == "127.0.0.1" and {p for _, p in listeners[s.pid]} == {int(port)}, (s.worker_id, listeners[s.pid])
    # The HTTP fronts counted above are really up.
    assert http(f"http://127.0.0.1:{cluster.http_port}", "/health")[0] == 200
    assert http(f"http://127.0.0.1:{cluster.metrics_port}", "/metrics")[0] == 200


# ---- strangers ------------------------------------------------------------------------------------
def _worker_request(rid="hostile#0", prompt=(256, 1, 2, 3), output=(), **sampling) -> wpb.WorkerRequest:
    sp = pb.SamplingParams(**{"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "ignore_eos": True, **sampling})
    return wpb.WorkerRequest(request_id=rid, prompt_token_ids=list(prompt), output_token_ids=list(output), sampling=sp, seed=0)


def _decode_request(c: Cluster, request: wpb.WorkerRequest | None = None, **source) -> wpb.DecodeRequest:
    """A well-formed Decode (KV of a 4-token prompt + 1 token on prefill-0), `source` fields replaced."""
    request = request or _worker_request("hostile#d", output=(5,))
    kv = wpb.KVDescriptor(num_layers=CONFIG.num_layers, num_kv_heads=CONFIG.num_kv_heads, head_dim=CONFIG.head_dim,
                          block_size=BLOCK, num_tokens=len(request.prompt_token_ids) + len(request.output_token_ids) - 1,
                          dtype="float32")
    src = wpb.KVSource(worker_id="prefill-0", address=c.address("prefill-0"), kv=kv, lease_ms=5000)
    for k, v in source.items():
        if k.startswith("kv_"):
            setattr(src.kv, k[3:], v)
        else:
            setattr(src, k, v)
    return wpb.DecodeRequest(request=request, source=src)


def _forged(address: str, **kw) -> wpb.WorkerInfo:
    """decode-0's registration, fingerprint and all, but at `address`."""
    info = dict(worker_id="decode-0", role=wpb.DECODE, address=address, pid=4242, tp=1, pp=1, model="tiny-llama",
                block_size=BLOCK, dtype="float32", weights_hash=weights_fingerprint("tiny-llama", dummy_weights=True))
    return wpb.WorkerInfo(**{**info, **kw})


ROUTER = ("public", "cluster")
# name -> (where: the router's ports or a worker, the call on a channel to it)
STRANGER_CALLS = {
    "Register": (ROUTER, lambda ch, c, bait: wgrpc.RegistryStub(ch).Register(_forged(bait), timeout=10)),
    "Heartbeat": (ROUTER, lambda ch, c, bait: wgrpc.RegistryStub(ch).Heartbeat(
        wpb.HeartbeatRequest(worker_id="decode-0", stats=wpb.InstanceStats(pid=4242)), timeout=10)),
    "Admin": (ROUTER, lambda ch, c, bait: wgrpc.AdminStub(ch).Instances(wpb.InstancesRequest(), timeout=10)),
    "Register garbage": (ROUTER, lambda ch, c, bait: raw_call(ch, "/dsjax.v1.Registry/Register", b"\xff\xff\xff")),
    "Prefill": (("prefill-0",), lambda ch, c, bait: wgrpc.PrefillWorkerStub(ch).Prefill(
        wpb.PrefillRequest(request=_worker_request()), timeout=10)),
    "PullKV": (("prefill-0",), lambda ch, c, bait: list(wgrpc.PrefillWorkerStub(ch).PullKV(
        wpb.PullKVRequest(request_id="hostile#0"), timeout=10))),
    "RenewLease": (("prefill-0",), lambda ch, c, bait: wgrpc.PrefillWorkerStub(ch).RenewLease(
        wpb.LeaseRequest(request_ids=["hostile#0"]), timeout=10)),
    "ReleaseKV": (("prefill-0",), lambda ch, c, bait: wgrpc.PrefillWorkerStub(ch).ReleaseKV(
        wpb.LeaseRequest(request_ids=["hostile#0"]), timeout=10)),
    "Decode": (("decode-0",), lambda ch, c, bait: list(wgrpc.DecodeWorkerStub(ch).Decode(
        _decode_request(c, address=bait), timeout=10))),
    "Stats": (("prefill-0", "decode-0"), lambda ch, c, bait: wgrpc.WorkerStub(ch).Stats(wpb.StatsRequest(), timeout=10)),
}


@pytest.mark.parametrize("name", STRANGER_CALLS)
def test_strangers_are_refused(cluster, name):
    where, call = STRANGER_CALLS[name]
    ports = {"public": cluster.target, "cluster": cluster.cluster_target}
    bait = Bait()
    try:
        for address in [ports.get(w) or cluster.address(w) for w in where]:
            for token in (None, "guessed", os.environ[TOKEN_ENV] + "x", os.environ[TOKEN_ENV][:-1]):
                with with_token(grpc.insecure_channel(address), token) as ch:
                    e = refused(lambda: call(ch, cluster, bait.address))
                assert e.code() == UNAUTH, (name, address, token, e)
                assert "cluster token" in e.details() and TOKEN_ENV in e.details(), e.details()
        assert not bait.dialled()
    finally:
        bait.close()


def test_forged_registration_leaves_serving_untouched(cluster):
    before = membership(cluster)
    bait = Bait()
    try:
        for address in (cluster.target, cluster.cluster_target):
            with grpc.insecure_channel(address) as ch:  # a stranger: no token
                e = refused(lambda: wgrpc.RegistryStub(ch).Register(_forged(bait.address), timeout=10))
                assert e.code() == UNAUTH and "Register" in e.details()
        # With a member's token but another fingerprint: refused too, naming the field and both values.
        with internal_channel(cluster.cluster_target) as ch:
            for name, value in (("dtype", "bfloat16"), ("block_size", 32), ("weights_hash", "xxh3:0000000000000000"),
                                ("model", "small-llama")):
                e = refused(lambda: wgrpc.RegistryStub(ch).Register(_forged(bait.address, **{name: value}), timeout=10))
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and f"{name}={value!r}" in e.details(), e
        assert membership(cluster) == before
        for _ in range(3):  # routed to the real decode-0, every time
            assert generate(cluster.channel) == cluster.baseline
        assert not bait.dialled(), "the router dialled the forged address"
    finally:
        bait.close()


def test_decode_from_a_foreign_source_is_refused_before_dialling(cluster):
    """With the cluster token (a compromised or buggy member): a KV source the router does not list
    as a prefill worker is refused, and the decode worker never connects to it with its credentials."""
    bait = Bait()
    try:
        with internal_channel(cluster.address("decode-0")) as ch:
            e = refused(lambda: list(wgrpc.DecodeWorkerStub(ch).Decode(_decode_request(cluster, address=bait.address),
                                                                       timeout=20)))
        assert e.code() == INVALID and f"source.address={bait.address!r}" in e.details()
        assert "not a registered prefill worker" in e.details()
        assert not bait.dialled()
    finally:
        bait.close()


# ---- malformed public messages ------------------------------------------------------------------
def _gen(prompt=None, **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**{"max_tokens": 4, **sampling}))
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


_SAMPLING = pb.SamplingParams(max_tokens=4).SerializeToString()
# name -> (request, or raw bytes for what a protobuf library refuses to build; status; text in the message)
PUBLIC_CASES = {
    "empty text": (_gen(""), INVALID, "prompt"),
    "no prompt": (_gen(), INVALID, "prompt"),
    "empty token ids": (_gen([]), INVALID, "prompt"),
    "max_tokens 0": (_gen("x", max_tokens=0), INVALID, "max_tokens"),
    "negative max_tokens": (_gen("x", max_tokens=-3), INVALID, "max_tokens"),
    "huge max_tokens": (_gen("x", max_tokens=2**31 - 1), INVALID, "max_tokens"),
    "negative temperature": (_gen("x", temperature=-0.5), INVALID, "temperature"),
    "NaN temperature": (_gen("x", temperature=math.nan), INVALID, "temperature"),
    "infinite temperature": (_gen("x", temperature=math.inf), INVALID, "temperature"),
    "top_p 0": (_gen("x", top_p=0.0), INVALID, "top_p"),
    "top_p over 1": (_gen("x", top_p=1.5), INVALID, "top_p"),
    "NaN top_p": (_gen("x", top_p=math.nan), INVALID, "top_p"),
    "negative top_k": (_gen("x", top_k=-1), INVALID, "top_k"),
    "seed over 2**32": (_gen("x", seed=2**40), INVALID, "seed"),
    "negative seed": (_gen("x", seed=-1), INVALID, "seed"),
    "token id over the vocabulary": (_gen([1, CONFIG.vocab_size]), INVALID, "vocabulary"),
    "negative token id": (_gen([-7]), INVALID, "vocabulary"),
    "prompt over the context": (_gen([1] * (MAX_LEN + 3)), INVALID, "prompt length"),
    "prompt + max_tokens over the context": (_gen([1] * 100, max_tokens=100), INVALID, "max_tokens"),
    "17 stop strings": (_gen("x", stop=[f"s{i}" for i in range(17)]), INVALID, "stop"),
    "stop string of 257 characters": (_gen("x", stop=["z" * 257]), INVALID, "stop"),
    "empty stop string": (_gen("x", stop=[""]), INVALID, "stop"),
    "stop id over the vocabulary": (_gen("x", stop_token_ids=[CONFIG.vocab_size + 1]), INVALID, "stop_token_ids"),
    "oversized prompt (1 MiB)": (_gen("x" * (1 << 20)), INVALID, "message limit"),
    "text not UTF-8": (field(2, b"caf\xe9 \xff") + field(4, _SAMPLING), INVALID, "GenerateRequest"),
    "truncated message": (field(2, b"hello")[:-2], INVALID, "GenerateRequest"),
    "garbage bytes": (b"\xff" * 16, INVALID, "GenerateRequest"),
}


@pytest.mark.parametrize("case", PUBLIC_CASES)
def test_malformed_generate_requests(cluster, case):
    request, code, text = PUBLIC_CASES[case]
    if isinstance(request, bytes):
        e = refused(lambda: raw_call(cluster.channel, "/dsjax.v1.Generation/Generate", request, streaming=True))
    else:
        e = refused(lambda: generate(cluster.channel, request))
    assert e.code() == code, e
    assert text in e.details(), e.details()


def test_a_request_id_in_flight_cannot_be_reused(cluster):
    stub = dsjax_pb2_grpc.GenerationStub(cluster.channel)
    first = stub.Generate(pb.GenerateRequest(request_id="mine", token_ids=pb.TokenIds(ids=PROMPT),
                                             sampling=pb.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)))
    try:
        assert next(first).request_id == "mine"
        e = refused(lambda: generate(cluster.channel, pb.GenerateRequest(request_id="mine", text="x", sampling=GREEDY)))
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id='mine'" in e.details()
    finally:
        first.cancel()


_OK = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4}
# name -> (path, body: a dict merged over a good one, raw bytes, or None for a GET; HTTP status; text in the
# error message; the field it names)
HTTP_CASES = {
    "unknown model": ("/v1/completions", {"model": "gpt-4o"}, 404, "gpt-4o", "model"),
    "not JSON": ("/v1/completions", b"{'model': tiny", 400, "not valid JSON", None),
    "body not UTF-8": ("/v1/completions", b'{"model": "tiny-llama", "prompt": "caf\xe9"}', 400, "JSON", None),
    "prompt of the wrong type": ("/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt", "prompt"),
    "negative max_tokens": ("/v1/completions", {"max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    "max_tokens over int32": ("/v1/completions", {"max_tokens": 2**40}, 400, "max_tokens", "max_tokens"),
    "n 2": ("/v1/completions", {"n": 2}, 400, "n=2", "n"),
    "top_p over 1": ("/v1/completions", {"top_p": 3.0}, 400, "top_p", "top_p"),
    "unknown path": ("/v1/engines", None, 404, "Not Found", None),
    "GET on a POST route": ("/v1/completions", None, 405, "Method Not Allowed", None),
    "chat message without a role": ("/v1/chat/completions", {"prompt": None, "messages": [{"content": "hi"}]}, 400,
                                    "messages.0.role", "messages.0.role"),
}


@pytest.mark.parametrize("case", HTTP_CASES)
def test_malformed_http_requests(cluster, case):
    path, body, status, text, param = HTTP_CASES[case]
    if isinstance(body, dict):
        body = {k: v for k, v in {**_OK, **body}.items() if v is not None}
    got, answer = http(f"http://127.0.0.1:{cluster.http_port}", path, body)
    assert got == status, answer
    error = answer["error"]
    assert text in error["message"], error
    if param is not None:
        assert error["param"].startswith(param), error


# ---- malformed internal messages (with the cluster token) ---------------------------------------
def _prefill(msg):
    return lambda ch, c: wgrpc.PrefillWorkerStub(ch).Prefill(wpb.PrefillRequest(request=msg), timeout=10)


def _decode(request=None, **source):
    return lambda ch, c: list(wgrpc.DecodeWorkerStub(ch).Decode(_decode_request(c, request, **source), timeout=10))


def _lease(method: str, ids):
    return lambda ch, c: getattr(wgrpc.PrefillWorkerStub(ch), method)(wpb.LeaseRequest(request_ids=ids), timeout=10)


def _pull(**kw):
    return lambda ch, c: list(wgrpc.PrefillWorkerStub(ch).PullKV(wpb.PullKVRequest(**kw), timeout=10))


def _register(**kw):
    info = _forged(kw.pop("address", "127.0.0.1:1"), **{"worker_id": "decode-9", **kw})
    return lambda ch, c: wgrpc.RegistryStub(ch).Register(info, timeout=10)


def _raw(method: str, payload: bytes, streaming=False):
    return lambda ch, c: raw_call(ch, method, payload, streaming=streaming)


_RESOURCE = grpc.StatusCode.RESOURCE_EXHAUSTED
# name -> (where, call, status, text in the message)
INTERNAL_CASES = {
    "Prefill: empty request id": ("prefill-0", _prefill(_worker_request("")), INVALID, "request.request_id"),
    "Prefill: unprintable request id": ("prefill-0", _prefill(_worker_request("a\x00b")), INVALID, "request.request_id"),
    "Prefill: request id of 300 characters": ("prefill-0", _prefill(_worker_request("r" * 300)), INVALID, "request.request_id"),
    "Prefill: empty prompt": ("prefill-0", _prefill(_worker_request(prompt=())), INVALID, "request.prompt_token_ids"),
    "Prefill: prompt beyond the context": ("prefill-0", _prefill(_worker_request(prompt=[1] * (MAX_LEN + 1))), INVALID,
                                          "context"),
    "Prefill: max_tokens beyond the context": ("prefill-0", _prefill(_worker_request(prompt=[1] * 100, max_tokens=60)),
                                               INVALID, "request.sampling.max_tokens"),
    "Prefill: token outside the vocabulary": ("prefill-0", _prefill(_worker_request(prompt=[1, 9999])), INVALID,
                                              "request.prompt_token_ids"),
    "Prefill: eos id outside the vocabulary": ("prefill-0", _prefill(wpb.WorkerRequest(
        request_id="e#0", prompt_token_ids=[1, 2], sampling=pb.SamplingParams(max_tokens=2, top_p=1.0), eos_token_ids=[-2])),
        INVALID, "request.eos_token_ids"),
    "Prefill: stop id outside the vocabulary": ("prefill-0", _prefill(_worker_request(stop_token_ids=[CONFIG.vocab_size])),
                                                INVALID, "request.sampling.stop_token_ids"),
    "Prefill: NaN temperature": ("prefill-0", _prefill(_worker_request(temperature=math.nan)), INVALID, "temperature"),
    "Prefill: top_p 0": ("prefill-0", _prefill(_worker_request(top_p=0.0)), INVALID, "top_p"),
    "Prefill: oversize message (3 MiB)": ("prefill-0", _prefill(_worker_request("z" * (3 << 20))), _RESOURCE, ""),
    "Prefill: request id not UTF-8": ("prefill-0", _raw("/dsjax.v1.PrefillWorker/Prefill", field(1, field(1, b"\xc3\x28"))),
                                      INVALID, "UTF-8"),
    "PullKV: negative max_chunk_bytes": ("prefill-0", _pull(request_id="r#0", max_chunk_bytes=-1), INVALID, "max_chunk_bytes"),
    "PullKV: empty request id": ("prefill-0", _pull(request_id=""), INVALID, "request_id"),
    "PullKV: unknown request id": ("prefill-0", _pull(request_id="nobody#0"), grpc.StatusCode.NOT_FOUND, "'nobody#0'"),
    "PullKV: garbage bytes": ("prefill-0", _raw("/dsjax.v1.PrefillWorker/PullKV", b"\x0a\x7fab", streaming=True), INVALID,
                              "PullKVRequest"),
    "RenewLease: empty id": ("prefill-0", _lease("RenewLease", ["ok#0", ""]), INVALID, "request_ids[1]"),
    "RenewLease: too many ids": ("prefill-0", _lease("RenewLease", [f"r{i}" for i in range(MAX_IDS_PER_CALL + 1)]),
                                 INVALID, "request_ids"),
    "ReleaseKV: unprintable id": ("prefill-0", _lease("ReleaseKV", ["\x1b[2J"]), INVALID, "request_ids[0]"),
    "Decode: block size beyond the context": ("decode-0", _decode(kv_block_size=1 << 20), INVALID, "source.kv.block_size"),
    "Decode: block size 0": ("decode-0", _decode(kv_block_size=0), INVALID, "source.kv.block_size"),
    "Decode: lease beyond the maximum": ("decode-0", _decode(lease_ms=MAX_LEASE_MS + 1), INVALID, "source.lease_ms"),
    "Decode: negative lease": ("decode-0", _decode(lease_ms=-1), INVALID, "source.lease_ms"),
    "Decode: KV tokens the request does not imply": ("decode-0", _decode(kv_num_tokens=50), INVALID, "source.kv.num_tokens"),
    "Decode: empty source address": ("decode-0", _decode(address=""), INVALID, "source.address"),
    "Decode: no sampled token": ("decode-0", _decode(_worker_request("d#1")), INVALID, "request.output_token_ids"),
    "Decode: tokens beyond the context": ("decode-0", _decode(_worker_request("d#2", prompt=[1] * 120, output=[1] * 9)),
                                          INVALID, "context"),
    "Register: empty worker id": ("cluster", _register(worker_id=""), INVALID, "worker_id"),
    "Register: address of 300 characters": ("cluster", _register(address="h" * 300), INVALID, "address"),
    "Register: no role": ("cluster", _register(role=wpb.ROLE_UNSPECIFIED), INVALID, "role"),
    "Register: role 9": ("cluster", _register(role=9), INVALID, "role=9"),
    "Register: a replica in a disaggregated cluster": ("cluster", _register(role=wpb.COLOCATED),
                                                      grpc.StatusCode.FAILED_PRECONDITION, "role=COLOCATED"),
    "Register: garbage bytes": ("cluster", _raw("/dsjax.v1.Registry/Register", b"\xff" * 8), INVALID, "WorkerInfo"),
}


@pytest.mark.parametrize("case", INTERNAL_CASES)
def test_malformed_internal_requests(cluster, case):
    where, call, code, text = INTERNAL_CASES[case]
    with internal_channel(cluster.cluster_target if where == "cluster" else cluster.address(where)) as ch:
        e = refused(lambda: call(ch, cluster))
    assert e.code() == code, e
    assert text in e.details(), e.details()


# ---- afterwards -----------------------------------------------------------------------------------
def test_the_cluster_serves_correct_tokens_afterwards(cluster):
    assert generate(cluster.channel) == cluster.baseline
    text = generate(cluster.channel, pb.GenerateRequest(text="still serving", sampling=GREEDY))
    assert len(text) == GREEDY.max_tokens
    stats = wait_idle(cluster.cluster_target)  # every block free, nothing queued, held or pulling
    assert [(s.worker_id, s.pid, s.alive, s.hung) for s in stats] == \
        [(w, cluster.workers[w].pid, True, False) for w in ("prefill-0", "decode-0")]  # no worker restarted
    assert all(s.free_blocks == s.num_blocks for s in stats)
    tracebacks = {p.name: p.read_text().count("Traceback") for p in cluster.logs.glob("*.log")}
    assert not any(tracebacks.values()), tracebacks
