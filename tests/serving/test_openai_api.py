"""The OpenAI HTTP front over real HTTP on loopback, driven by the official `openai` client, in
front of a deterministic fake backend (tests/support/serving.py): every parameter, error and
stream shape, overload, disconnects and the API key. test_openai_server.py runs a real server."""

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from models.config import PRESETS
from models.tokenizer import ByteTokenizer
from serving.generation import Generation
from serving.http_server import HttpServer, OpenAIApp
from serving.prometheus import ServingMetrics
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.router import RouterServer
from tests.support.serving import FakeBackend, free_port

MODEL = "tiny-llama"
CONFIG = PRESETS[MODEL]


@pytest.fixture
def front():
    """(the fake backend, an OpenAI client of a fresh server, its base URL); max_pending 4."""
    servers = []
    def start(*, step_s=0.001, max_pending=4, api_key=None):
        backend = FakeBackend(step_s=step_s)
        metrics = ServingMetrics(backend.instances)
        generation = Generation(backend, ByteTokenizer(CONFIG.vocab_size), CONFIG, max_pending=max_pending, metrics=metrics)
        api = OpenAIApp(generation, model_names=[MODEL], ready=backend.ready, metrics_text=metrics.text, api_key=api_key)
        server = HttpServer(api, host="127.0.0.1", port=0).start()
        servers.append(server)
        url = f"http://127.0.0.1:{server.port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0, timeout=30)
        _wait_http(url)
        return backend, client, url

    yield start
    for s in servers:
        s.stop()


def http(url: str, body: bytes | dict | None = None) -> tuple[int, str]:
    """(status, body text) of a GET, or of a POST of `body` (a dict is sent as JSON)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait_http(url: str) -> None:
    for _ in range(200):
        try:
            http(f"{url}/health")
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(url)


def _expected_text(prompt_ids: list[int], n: int) -> str:
    """The fake backend emits (last prompt id + i) % 256 for i = 1..n: bytes of the reply."""
    return ByteTokenizer(CONFIG.vocab_size).decode([(prompt_ids[-1] + i) % 256 for i in range(1, n + 1)])


def test_models_health_and_metrics(front):
    _, client, url = front()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http(f"{url}/health")[0] == 200
    client.completions.create(model=MODEL, prompt="ab", max_tokens=2)
    assert 'dsjax_requests_total{finish_reason="length"} 1.0' in http(f"{url}/metrics")[1]


def test_completion_text_usage_and_token_prompt(front):
    backend, client, _ = front()
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, seed=7, top_p=0.5,
                                    extra_body={"top_k": 3, "ignore_eos": True})
    prompt_ids = ByteTokenizer(CONFIG.vocab_size).encode("Hello")
    assert out.choices[0].text == _expected_text(prompt_ids, 5)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(prompt_ids), 5, len(prompt_ids) + 5)
    sp = backend.jobs[-1].sampling
    assert (sp.max_tokens, sp.temperature, sp.seed, sp.top_k, sp.ignore_eos) == (5, 0.0, 7, 3, True)
    assert sp.top_p == pytest.approx(0.5)
    out = client.completions.create(model=MODEL, prompt=[10, 20, 30], max_tokens=3)
    assert backend.jobs[-1].prompt_token_ids == [10, 20, 30]
    assert out.choices[0].text == _expected_text([10, 20, 30], 3)
    client.completions.create(model=MODEL, prompt=["one prompt in a list"], max_tokens=1, stop=["zz"])
    assert backend.jobs[-1].sampling.stop == ("zz",)


def test_streamed_completion_equals_plain_and_reports_usage(front):
    _, client, _ = front()
    plain = client.completions.create(model=MODEL, prompt="stream me", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="stream me", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    # vLLM's return_token_ids: every chunk carries its tokens (what the benchmark times)
    chunks = client.completions.create(model=MODEL, prompt="stream me", max_tokens=12, stream=True,
                                       extra_body={"return_token_ids": True})
    ids = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
    last = ByteTokenizer(CONFIG.vocab_size).encode("stream me")[-1]
    assert ids == [(last + i) % 256 for i in range(1, 13)]


def test_chat_completion_plain_and_streamed(front):
    backend, client, _ = front()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=4, temperature=0)
    template = "system: Be brief.\nuser: Hi\nassistant:"
    assert backend.jobs[-1].prompt_token_ids == ByteTokenizer(CONFIG.vocab_size).encode(template)
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sixteen_concurrent_streams(front):
    _, client, _ = front(step_s=0.002, max_pending=32)
    results: dict[int, str] = {}

    def run(i: int) -> None:
        stream = client.completions.create(model=MODEL, prompt=f"p{i:02d}", max_tokens=20, stream=True)
        results[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    tok = ByteTokenizer(CONFIG.vocab_size)
    assert results == {i: _expected_text(tok.encode(f"p{i:02d}"), 20) for i in range(16)}


def test_client_disconnect_cancels_the_request(front):
    backend, client, _ = front(step_s=0.01)
    with client.completions.with_streaming_response.create(model=MODEL, prompt="long", max_tokens=500, stream=True) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 10
    while not backend.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [j.request_id for j in backend.jobs] == sorted(backend.cancelled)
    # the admission slot came back: a full queue's worth of requests still fits
    for _ in range(4):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)


@pytest.mark.parametrize("kwargs, status, needle", [
    ({"max_tokens": -1}, 400, "max_tokens=-1"),
    ({"max_tokens": 10**12}, 400, "max_tokens=1000000000000"),
    ({"max_tokens": 10**6}, 400, "max_tokens=1000000 is over the server's limit"),
    ({"temperature": -0.5}, 400, "temperature=-0.5"),
    ({"top_p": 1.5}, 400, "top_p=1.5"),
    ({"extra_body": {"top_k": -2}}, 400, "top_k=-2"),
    ({"seed": -3}, 400, "seed=-3"),
    ({"n": 2}, 400, "n=2"),
    ({"logprobs": 2}, 400, "logprobs=2"),
    ({"extra_body": {"min_tokens": 3}}, 400, "min_tokens=3"),
    ({"prompt": "x" * 600}, 400, "context length 512"),
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": [1, 10**9]}, 400, "vocabulary"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"model": "gpt-4"}, 404, "gpt-4"),
])
def test_bad_parameters_get_a_4xx_naming_the_field(front, kwargs, status, needle):
    _, client, _ = front()
    args = {"model": MODEL, "prompt": "ok", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**args)
    assert info.value.status_code == status
    assert needle in info.value.body["message"], info.value.body
    assert client.completions.create(model=MODEL, prompt="still serving", max_tokens=2).usage.completion_tokens == 2


def test_malformed_bodies(front):
    _, client, url = front()
    cases = [
        ("/v1/completions", b'{"model": "tiny-llama", "prompt": ', "message", "not valid JSON"),
        ("/v1/completions", {"model": MODEL}, "param", "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, "param", "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "param", "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "message", "messages.0.role"),
    ]
    for path, body, key, needle in cases:
        status, text = http(f"{url}{path}", body)
        assert status == 400 and needle in json.loads(text)["error"][key], (body, text)
    assert client.completions.create(model=MODEL, prompt="fine", max_tokens=1).choices[0].finish_reason == "length"


def test_overload_is_429_and_recovers(front):
    backend, client, _ = front(max_pending=2)
    backend.gate = threading.Event()  # hold every admitted request before its first token
    held = [threading.Thread(target=client.completions.create, kwargs={"model": MODEL, "prompt": "a", "max_tokens": 1})
            for _ in range(2)]
    for t in held:
        t.start()
    deadline = time.monotonic() + 10
    while len(backend.jobs) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=MODEL, prompt="one too many", max_tokens=1)
    assert "max_pending=2" in info.value.body["message"]
    backend.gate.set()
    for t in held:
        t.join(10)
    assert client.completions.create(model=MODEL, prompt="again", max_tokens=1).usage.completion_tokens == 1


def test_api_key_guards_both_fronts(front):
    _, client, url = front(api_key="s3cret")
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).usage.completion_tokens == 1
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert http(f"{url}/health")[0] == 200  # probes need no key

    backend = FakeBackend()
    router = RouterServer(backend, ByteTokenizer(CONFIG.vocab_size), CONFIG, port=free_port(), api_key="s3cret").start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{router.port}") as ch:
            stub = dsjax_pb2_grpc.GenerationStub(ch)
            req = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2))
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(req, timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            out = list(stub.Generate(req, timeout=10, metadata=[("authorization", "Bearer s3cret")]))
            assert sum(len(m.token_ids) for m in out) == 2
    finally:
        router.stop()


class _DeadBackend(FakeBackend):
    """Every request ends with UNAVAILABLE (as when the worker holding it died); not ready."""

    def submit(self, job):
        from serving.engine_loop import ErrorEvent, Outbox
        from tests.support.serving import _FakeHandle

        self.jobs.append(job)
        outbox = Outbox()
        outbox.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, "no decode worker is registered"))
        return _FakeHandle(outbox, lambda: None)

    def ready(self) -> bool:
        return False


def test_unavailable_backend_is_503_and_health_says_so():
    backend = _DeadBackend()
    generation = Generation(backend, ByteTokenizer(CONFIG.vocab_size), CONFIG)
    api = OpenAIApp(generation, model_names=[MODEL], ready=backend.ready, metrics_text=lambda: b"")
    server = HttpServer(api, host="127.0.0.1", port=0).start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        _wait_http(url)
        assert http(f"{url}/health")[0] == 503
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 503 and "no decode worker" in info.value.body["message"]
        events = [json.loads(line[6:]) for line in http(f"{url}/v1/completions", {"model": MODEL, "prompt": "hi", "stream": True})[1].splitlines()
                  if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "unavailable"  # mid-stream, the error travels as an event
    finally:
        server.stop()
