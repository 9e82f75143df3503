"""The router over real gRPC with a deterministic fake backend (no jax programs): validation,
admission, streaming text and stop strings, cancellation, health, reflection and metrics."""

import json
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from models.config import PRESETS
from models.tokenizer import ByteTokenizer
from serving.prometheus import MetricsServer
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.router import RouterServer
from serving.text_stream import TextStream
from serving.validation import Limits
from tests.support.serving import FakeBackend, wait_serving

MAX_PENDING = 4
CONFIG = PRESETS["tiny-llama"]


@pytest.fixture(scope="module")
def server():
    backend = FakeBackend(step_s=0.002)
    router = RouterServer(backend, ByteTokenizer(CONFIG.vocab_size), CONFIG, port=0, host="localhost",
                          limits=Limits(max_request_bytes=4096, max_tokens=300), max_pending=MAX_PENDING).start()
    metrics = MetricsServer(router.metrics, backend.instances, port=0, host="localhost")
    wait_serving(f"localhost:{router.port}", timeout=5)
    with grpc.insecure_channel(f"localhost:{router.port}") as channel:
        yield backend, channel, metrics.port
    metrics.close()
    router.stop(0)


def generate(channel, **kw):
    msgs = list(dsjax_pb2_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(**kw), timeout=10))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs), msgs


def test_streams_text_and_tokens(server):
    _, channel, _ = server
    ids, text, msgs = generate(channel, text="a", request_id="mine", sampling=pb.SamplingParams(max_tokens=5))
    assert ids == [98, 99, 100, 101, 102] and text == "bcdef"
    assert all(m.request_id == "mine" for m in msgs)
    assert msgs[-1].finish_reason == pb.LENGTH and all(m.finish_reason == 0 for m in msgs[:-1])
    t = msgs[-1].timing
    assert t.arrival_time <= t.first_token_time <= t.time
    ids, _, msgs = generate(channel, token_ids=pb.TokenIds(ids=[256, 200]), sampling=pb.SamplingParams(max_tokens=2))
    assert ids == [201, 202] and msgs[0].request_id.startswith("req-")


def test_stop_string_cuts_text_and_cancels(server):
    backend, channel, _ = server
    ids, text, msgs = generate(channel, text="a", request_id="stop-1", sampling=pb.SamplingParams(max_tokens=50, stop=["de"]))
    assert text == "bc" and ids == [98, 99, 100, 101] and msgs[-1].finish_reason == pb.STOP
    assert "stop-1" in backend.cancelled
    _, text, msgs = generate(channel, text="a", sampling=pb.SamplingParams(max_tokens=4, stop=["ex", "dz"]))
    assert text == "bcde" and msgs[-1].finish_reason == pb.LENGTH  # held-back prefixes are released at the end


def test_text_stream_holds_back_stop_prefixes():
    ts = TextStream(ByteTokenizer(CONFIG.vocab_size), [256], stop=["END"])
    assert ts.add(list(b"abE")) == ("ab", False)
    assert ts.add(list(b"N")) == ("", False)
    assert ts.add(list(b"X")) == ("ENX", False)
    assert ts.add(list(b"yEND!")) == ("y", True)
    assert ts.finish() == ""


def test_cancellation_reaches_the_backend(server):
    backend, channel, _ = server
    call = dsjax_pb2_grpc.GenerationStub(channel).Generate(
        pb.GenerateRequest(text="z", request_id="to-cancel", sampling=pb.SamplingParams(max_tokens=200)))
    next(call)
    call.cancel()
    deadline = time.monotonic() + 5
    while "to-cancel" not in backend.cancelled:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_admission_queue_full_is_resource_exhausted(server):
    backend, channel, _ = server
    stub = dsjax_pb2_grpc.GenerationStub(channel)
    backend.gate = threading.Event()
    try:
        calls = [stub.Generate(pb.GenerateRequest(text="q", sampling=pb.SamplingParams(max_tokens=2))) for _ in range(MAX_PENDING)]
        deadline = time.monotonic() + 5
        while sum(j.prompt_token_ids[-1] == ord("q") for j in backend.jobs) < MAX_PENDING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as e:
            generate(channel, text="over", sampling=pb.SamplingParams(max_tokens=2))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending=4" in e.value.details()
    finally:
        backend.gate.set()
    assert all(list(c)[-1].finish_reason == pb.LENGTH for c in calls)
    assert generate(channel, text="after", sampling=pb.SamplingParams(max_tokens=1))[0] == [ord("r") + 1]


def test_duplicate_request_id_in_flight(server):
    _, channel, _ = server
    stub = dsjax_pb2_grpc.GenerationStub(channel)
    first = stub.Generate(pb.GenerateRequest(text="d", request_id="dup", sampling=pb.SamplingParams(max_tokens=100)))
    next(first)
    with pytest.raises(grpc.RpcError) as e:
        generate(channel, text="d", request_id="dup")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()


@pytest.mark.parametrize("sampling, field", [
    (pb.SamplingParams(seed=-1), "seed"),
    (pb.SamplingParams(seed=2**32), "seed"),
    (pb.SamplingParams(temperature=float("nan")), "temperature"),
    (pb.SamplingParams(max_tokens=301), "max_tokens"),
    (pb.SamplingParams(stop_token_ids=[600]), "stop_token_ids"),
    (pb.SamplingParams(stop=[""]), "stop"),
    (pb.SamplingParams(max_tokens=300), "context"),  # with a 300-token prompt: 600 > 512
])
def test_sampling_errors_name_the_field(server, sampling, field):
    _, channel, _ = server
    prompt = [1] * 300 if field == "context" else [1]
    with pytest.raises(grpc.RpcError) as e:
        generate(channel, token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()


def test_request_over_the_message_limit(server):
    _, channel, _ = server
    with pytest.raises(grpc.RpcError) as e:
        generate(channel, text="x" * 5000)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "4096 bytes" in e.value.details()


def test_health_and_reflection(server):
    _, channel, _ = server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dsjax.v1.Generation"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in resp.list_services_response.service}
    assert {"dsjax.v1.Generation", "grpc.health.v1.Health", "dsjax.v1.Admin"} <= names
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="dsjax.v1.Generation")]))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_metrics_and_debug_endpoint(server):
    _, channel, port = server
    generate(channel, text="m", sampling=pb.SamplingParams(max_tokens=3))
    body = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=5).read().decode()
    for name in ("dsjax_ttft_seconds_count", "dsjax_tpot_seconds_count", "dsjax_router_active_requests",
                 'dsjax_instance_free_blocks{instance="fake-0"', "dsjax_kv_transfer_bytes_total", 'dsjax_requests_total{finish_reason="length"}'):
        assert name in body, name
    doc = json.loads(urllib.request.urlopen(f"http://localhost:{port}/debug/instances", timeout=5).read())
    assert doc["instances"][0]["free_blocks"] == 8
    admin = worker_pb2_grpc.AdminStub(channel).Instances(wpb.InstancesRequest())
    assert [s.worker_id for s in admin.instances] == ["fake-0"]


class _BrokenEngine:
    """An engine whose first step raises: the backend must end every stream, not hang."""

    def __init__(self):
        self.n = 0

    def add_request(self, req):
        self.n += 1

    def abort(self, request_id):
        return False

    def has_unfinished(self):
        return self.n > 0

    def step(self):
        raise RuntimeError("device lost")


def test_engine_death_ends_streams_and_health():
    from serving.inprocess import InProcessBackend

    backend = InProcessBackend(_BrokenEngine())
    backend.start()
    backend.warm = True
    router = RouterServer(backend, ByteTokenizer(CONFIG.vocab_size), CONFIG, port=0, host="localhost").start()
    try:
        with grpc.insecure_channel(f"localhost:{router.port}") as channel:
            with pytest.raises(grpc.RpcError) as e:
                generate(channel, text="x")
            assert e.value.code() == grpc.StatusCode.INTERNAL and "device lost" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                generate(channel, text="y")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 5
            while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        router.stop(0)


def test_max_model_len_caps_prompt_plus_output():
    """--max-model-len: a request must fit prompt + max_tokens within it (below the model's 512)."""
    from serving.validation import validate_request

    limits = Limits(max_model_len=64)
    tok = ByteTokenizer(CONFIG.vocab_size)
    ids, sampling = validate_request(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 40),
                                                        sampling=pb.SamplingParams(max_tokens=24)), tok, CONFIG, limits)
    assert len(ids) == 40 and sampling.max_tokens == 24
    with pytest.raises(ValueError, match="max_tokens=25 .* context length 64"):
        validate_request(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 40), sampling=pb.SamplingParams(max_tokens=25)),
                         tok, CONFIG, limits)
    with pytest.raises(ValueError, match="prompt length 64 must be below the context length 64"):
        validate_request(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 64), sampling=pb.SamplingParams(max_tokens=1)),
                         tok, CONFIG, limits)
    with pytest.raises(ValueError, match="max_model_len=1"):
        Limits(max_model_len=1)


def test_unset_sampling_fields_take_the_checkpoints_generation_defaults():
    """generation_config.json's temperature / top_p fill what a request leaves unset (do_sample
    false: greedy); what the request sets wins; without a generation config, SamplingParams'."""
    import dataclasses

    from models.config import GenerationDefaults
    from serving.validation import validate_request

    base = PRESETS["tiny-llama"]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams(max_tokens=4))
    _, plain = validate_request(request, ByteTokenizer(base.vocab_size), base, Limits())
    assert plain.temperature == 1.0 and plain.top_p == 1.0
    tuned = dataclasses.replace(base, generation=GenerationDefaults(do_sample=True, temperature=0.6, top_p=0.9))
    _, sp = validate_request(request, ByteTokenizer(base.vocab_size), tuned, Limits())
    assert (sp.temperature, sp.top_p) == (pytest.approx(0.6), pytest.approx(0.9))
    greedy = dataclasses.replace(base, generation=GenerationDefaults(do_sample=False, temperature=0.6))
    assert validate_request(request, ByteTokenizer(base.vocab_size), greedy, Limits())[1].temperature == 0.0
    request.sampling.temperature = 0.3
    assert validate_request(request, ByteTokenizer(base.vocab_size), tuned, Limits())[1].temperature == pytest.approx(0.3)
