"""The load generator over the OpenAI HTTP API and over gRPC, against one router (a fake backend
behind both fronts): the same requests, the same token counts and finish reasons either way."""

import pytest

from dsjax.bench.loadgen import run_load, send_schedule
from dsjax.bench.records import BenchRequest
from models.config import PRESETS
from models.tokenizer import ByteTokenizer
from serving.http_server import HttpServer, OpenAIApp
from serving.router import RouterServer
from tests.support.serving import FakeBackend, free_port

CONFIG = PRESETS["tiny-llama"]


@pytest.fixture
def both_fronts():
    backend = FakeBackend(step_s=0.002)
    router = RouterServer(backend, ByteTokenizer(CONFIG.vocab_size), CONFIG, port=free_port()).start()
    api = OpenAIApp(router.generation, model_names=["tiny-llama"], ready=backend.ready, metrics_text=router.metrics.text)
    http = HttpServer(api, host="127.0.0.1", port=0).start()
    yield backend, f"127.0.0.1:{router.port}", f"http://127.0.0.1:{http.port}"
    http.stop()
    router.stop()


def _requests() -> list[BenchRequest]:
    return [BenchRequest(index=i, prompt_len=4 + i, output_len=3 + 2 * i, prompt_token_ids=tuple(range(10, 14 + i)))
            if i % 2 else BenchRequest(index=i, prompt_len=5, output_len=3 + 2 * i, prompt_text=f"text{i}")
            for i in range(8)]


def test_http_and_grpc_runs_see_the_same_tokens(both_fronts):
    backend, grpc_target, http_target = both_fronts
    reqs = _requests()
    offsets = send_schedule(len(reqs), rate=50.0, seed=0)
    runs = {name: run_load(target, reqs, offsets, rate=50.0, progress=False, tag=name)
            for name, target in (("grpc", grpc_target), ("http", http_target))}
    for name, run in runs.items():
        assert [r.record.error for r in run.results] == [None] * len(reqs), name
        assert [r.record.output_len for r in run.results] == [q.output_len for q in reqs]
        assert [len(r.record.token_times_s) for r in run.results] == [q.output_len for q in reqs], name
        assert {r.finish_reason for r in run.results} == {"LENGTH"}
        assert all(r.record.token_times_s[0] >= r.record.send_s for r in run.results)
    assert len(backend.jobs) == 2 * len(reqs)
    assert all(j.sampling.temperature == 0.0 and j.sampling.ignore_eos for j in backend.jobs)
    # a token-id prompt travels as those ids over both fronts
    assert sum(j.prompt_token_ids == list(range(10, 15)) for j in backend.jobs) == 2


def test_http_target_without_a_server_is_a_connection_error():
    with pytest.raises(ConnectionError, match="OpenAI-compatible"):
        run_load(f"http://127.0.0.1:{free_port()}", _requests()[:1], [0.0], rate=1.0, progress=False, connect_timeout_s=2)


def test_fronts_benchmark_alternates_and_compares(both_fronts):
    import math

    from dsjax.bench.fronts import compare_fronts, markdown, ratios

    backend, grpc_target, http_target = both_fronts
    reqs = _requests()[:4]
    rows = compare_fronts({"grpc": grpc_target, "http": http_target}, reqs, [40.0, math.inf], rounds=2)
    assert sorted((r["front"], r["rate"]) for r in rows) == [("grpc", 40.0), ("grpc", math.inf), ("http", 40.0), ("http", math.inf)]
    assert all(r["rounds"] == 2 and r["failed"] == 0 and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["tokens_per_s_spread"][0] <= r["tokens_per_s"] <= r["tokens_per_s_spread"][1] for r in rows)
    assert len(backend.jobs) == 2 * 2 * 2 * len(reqs)  # rounds x rates x fronts
    rel = ratios(rows)
    assert sorted(r["rate"] for r in rel) == [40.0, math.inf] and all(r["tokens_per_s_ratio"] > 0 for r in rel)
    assert markdown(rows).count("\n") == 2 + len(rows)
