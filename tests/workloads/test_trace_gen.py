"""Trace generation: seeded arrivals with the requested rate and burstiness, exact JSONL format."""

import json

import numpy as np
import pytest

from dsjax.workloads import TraceConfig, TraceEntry, arrival_times, make_trace, read_trace, write_trace
from dsjax.workloads.__main__ import main


def gaps(config, n=40_000):
    return np.diff(arrival_times(n, config))


def test_poisson_rate_and_determinism():
    config = TraceConfig(rate=2.0, seed=7)
    times = arrival_times(1000, config)
    assert times[0] == 0.0 and times == sorted(times)
    assert times == arrival_times(1000, config)
    assert times != arrival_times(1000, TraceConfig(rate=2.0, seed=8))
    g = gaps(config)
    assert g.mean() == pytest.approx(0.5, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_rate_and_cv(cv):
    g = gaps(TraceConfig(rate=4.0, arrival="gamma", cv=cv, seed=1), n=100_000)
    assert g.mean() == pytest.approx(0.25, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.07)


def test_start_offset_and_empty():
    assert arrival_times(0, TraceConfig(rate=1.0)) == []
    assert arrival_times(3, TraceConfig(rate=1.0, start_s=5.0))[0] == 5.0


def test_jsonl_format_is_exact(tmp_path):
    entries = make_trace([(5, 7), (11, 1)], TraceConfig(rate=1.0, seed=0))
    path = tmp_path / "t.jsonl"
    write_trace(path, entries)
    lines = path.read_text().splitlines()
    assert lines[0] == '{"arrival_s": 0.0, "prompt_len": 5, "output_len": 7}'
    second = json.loads(lines[1])
    assert list(second) == ["arrival_s", "prompt_len", "output_len"]
    assert isinstance(second["arrival_s"], float) and second["arrival_s"] > 0
    assert (second["prompt_len"], second["output_len"]) == (11, 1)
    assert read_trace(path) == entries


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rate=0.0),
        dict(rate=float("inf")),
        dict(rate=1.0, arrival="uniform"),
        dict(rate=1.0, arrival="gamma", cv=0.0),
        dict(rate=1.0, cv=2.0),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        TraceConfig(**kwargs)


def test_entry_validation(tmp_path):
    with pytest.raises(ValueError, match="prompt_len"):
        TraceEntry(arrival_s=0.0, prompt_len=0, output_len=1)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0.0, "prompt_len": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_trace(path)


def test_cli_writes_trace_and_stats(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "trace.jsonl"
    argv = ["--workload", "humaneval", "--num", "50", "--rate", "2", "--out", str(out), "--scale", "4", "--stats"]
    assert main(argv) == 0
    entries = read_trace(out)
    assert len(entries) == 50 and entries[0].arrival_s == 0.0
    assert max(e.prompt_len for e in entries) <= 628 // 4
    assert "humaneval" in capsys.readouterr().out
    assert main(argv) == 0
    assert read_trace(out) == entries  # same seed, same file


def test_cli_rejects_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("DSJAX_CACHE", str(tmp_path))
    for argv in (
        ["--workload", "humaneval"],
        ["--workload", "humaneval", "--out", "x.jsonl"],
        ["--workload", "humaneval", "--stats", "--scale", "0.5"],
    ):
        with pytest.raises(SystemExit):
            main(argv)
