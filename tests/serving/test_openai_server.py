"""A real `python -m dsjax.serve` (tiny-llama, prefill and decode on two devices in one process)
driven over loopback by the official `openai` client: the HTTP front's answers match the gRPC
front's, streams match plain completions, and a client that leaves frees every KV block."""

import threading

import grpc
import openai
import pytest

from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from tests.serving.test_openai_api import http
from tests.support.serving import free_port, launch_server, stop_server, wait_idle, wait_serving

MODEL = "tiny-llama"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("openai") / "server.log"
    proc = launch_server(["--model", MODEL, "--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "-1"], log)
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", timeout=180, proc=proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    finally:
        stop_server(proc)


def test_models_and_health(server):
    client, _, url = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http(f"{url}/health") == (200, "ok")


def test_completion_matches_grpc_and_its_stream(server):
    client, target, _ = server
    prompt = "Once upon a time"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    assert plain.usage.completion_tokens == 12 and plain.choices[0].finish_reason == "length"
    assert plain.usage.prompt_tokens == len(prompt.encode()) + 1  # bytes + BOS
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    with grpc.insecure_channel(target) as ch:
        req = pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        msgs = list(dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=60))
    assert "".join(m.text for m in msgs) == plain.choices[0].text
    assert sum(len(m.token_ids) for m in msgs) == 12


def test_streamed_chat_completion(server):
    client, _, _ = server
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=6, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content


def test_sixteen_concurrent_streams_and_a_disconnect_leave_no_block_held(server):
    client, target, _ = server
    counts: dict[int, int] = {}

    def run(i: int) -> None:
        stream = client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=24, stream=True,
                                           stream_options={"include_usage": True}, **GREEDY)
        counts[i] = [c for c in stream][-1].usage.completion_tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    with client.completions.with_streaming_response.create(model=MODEL, prompt="leave early", max_tokens=400,
                                                           stream=True, **GREEDY) as resp:
        assert next(line for line in resp.iter_lines() if line.startswith("data:"))
    for t in threads:
        t.join(120)
    assert counts == {i: 24 for i in range(16)}
    stats = wait_idle(target, timeout=30)  # every instance: all blocks free, nothing queued or running
    assert stats and all(s.free_blocks == s.num_blocks for s in stats)


def test_bad_requests_then_serving_goes_on(server):
    client, _, _ = server
    for kwargs, needle in (({"prompt": "x" * 600}, "context length"), ({"max_tokens": 0}, "max_tokens=0"),
                           ({"temperature": -1}, "temperature=-1"), ({"n": 3}, "n=3")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**{"model": MODEL, "prompt": "hi", "max_tokens": 4, **kwargs})
        assert needle in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="llama-3-8b", prompt="hi", max_tokens=4)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=4, **GREEDY).usage.completion_tokens == 4
