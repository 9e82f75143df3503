import json

import pytest

from dsjax.engine.placement import load_plan
from dsjax.plan import main
from tests.support.planner_reference import distserve_profile


def test_trace_then_simulate_json(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    assert main(["trace", "--lengths", "sharegpt-like", "--num-requests", "300", "--rate", "1", "--out", str(trace)]) == 0
    capsys.readouterr()
    common = ["--profile", str(distserve_profile()), "--model", "opt-13b", "--workload", str(trace),
              "--rate", "3", "--ttft", "0.2", "--tpot", "0.1", "--json"]
    assert main(["simulate", "--mode", "disaggregated", "--prefill", "tp=2,pp=1,n=1", "--decode", "tp=1,pp=1,m=1"] + common) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("attainment", "ttft_attainment", "tpot_attainment", "ttft_p90_s", "tpot_p90_s"):
        assert key in out
    assert out["rate"] == pytest.approx(3.0) and out["num_devices"] == 3
    for mode in ("colocated", "chunked"):
        assert main(["simulate", "--mode", mode, "--tp", "1", "--pp", "1"] + common) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["placement"]["mode"] == mode


def test_search_writes_a_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["search", "--profile", str(distserve_profile()), "--model", "opt-13b", "--nodes", "1",
            "--gpus-per-node", "4", "--workload", "sharegpt-like", "--ttft", "0.2", "--tpot", "0.1",
            "--rel-tol", "0.05", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert line.startswith("best: prefill tp=2") and "colocated best" in line and "ratio" in line
    placement, meta = load_plan(out)
    for key in ("goodput", "per_device_goodput", "slo", "model", "profile", "colocated", "ratio_vs_colocated", "architecture"):
        assert key in meta
    # the plan written is the best architecture's (same profile), never one that serves less
    arch = meta["architecture"]
    chosen = arch["chosen"]
    assert f"chose {chosen}" in captured.err and {f["architecture"] for f in arch["fleets"]} >= {"disaggregated", "colocated",
                                                                                              "chunked"}
    best = max(f["goodput"] for f in arch["fleets"])
    assert arch["fleets"][0]["architecture"] == chosen and arch["fleets"][0]["goodput"] == pytest.approx(best)
    assert placement.mode == ("disaggregated" if chosen == "mixed" else chosen) and placement.num_devices <= 4
    assert all(g is None or g >= 1.0 - 1e-9 for g in arch["gain_over"].values())
    assert meta["model"] == "facebook/opt-13b" and meta["slo"]["ttft_s"] == 0.2


def test_bad_arguments_are_reported(capsys):
    argv = ["simulate", "--profile", str(distserve_profile()), "--model", "opt-13b", "--workload", "fixed:100:10",
            "--rate", "1", "--ttft", "1", "--tpot", "1", "--prefill", "tp=2,xx=1"]
    assert main(argv) == 2
    assert "bad phase spec" in capsys.readouterr().err


def test_dataset_workload_in_opt_tokens(tmp_path, monkeypatch, capsys):
    """--workload/--lengths accept a dataset name: load_workload's GPT-2 counts + 1 (OPT's BOS)."""
    from dsjax.plan import dataset_trace
    from dsjax.workloads import load_workload
    from dsjax.workloads.trace_gen import read_trace

    monkeypatch.setenv("DSJAX_CACHE", str(tmp_path / "cache"))
    trace = dataset_trace("humaneval", num_requests=100, seed=0)
    raw = load_workload("humaneval", num_requests=100, seed=0)
    assert trace.pairs() == [(p + 1, o + 1) for p, o in raw]
    assert trace.arrival_s[0] == 0.0 and trace.mean_rate == pytest.approx(1.0, rel=0.3)
    out = tmp_path / "he.jsonl"
    assert main(["trace", "--lengths", "humaneval", "--num-requests", "100", "--rate", "4", "--out", str(out)]) == 0
    assert read_trace(out).pairs() == trace.pairs() and read_trace(out).mean_rate == pytest.approx(4.0)
    capsys.readouterr()
    argv = ["simulate", "--profile", str(distserve_profile()), "--model", "opt-13b", "--workload", "humaneval",
            "--num-requests", "100", "--rate", "2", "--ttft", "0.125", "--tpot", "0.2", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["num_requests"] == 100


def test_fit_served_writes_a_profile(tmp_path, capsys):
    """Step logs of a served run -> a profile in the same schema, the base's other entries kept."""
    from dsjax.planner.latency import load_profile

    base = tmp_path / "base.json"
    base.write_text(json.dumps({"small-llama": {"1": {"prefill": [1, 0.02, 0], "decoding_smallbs": [0.5, 0.001, 0.03],
                                                      "decoding_largebs": [0.5, 0.001, 0.03]}},
                                "metadata": {"shape_buckets": {"block_size": 16, "attention": "padded"}}}))
    lines = []
    for rep in range(3):
        for n in (16, 64, 128, 256):
            lines.append({"t": 100.0 + rep, "ms": 2.0 + 0.05 * n, "calls": [{"kind": "prefill", "chunks": [[0, n]]}]})
        for b, ctx in ((1, 10), (4, 100), (8, 200), (16, 400)):
            lines.append({"t": 100.0 + rep, "ms": 1.5 + 0.1 * b, "calls": [{"kind": "decode", "ctx": [ctx] * b}]})
    lines.append({"t": 500.0, "ms": 9999.0, "calls": [{"kind": "decode", "ctx": [3]}]})  # outside --until
    log = tmp_path / "decode-0.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "served.json"
    assert main(["fit-served", str(log), "--profile", str(base), "--model", "small-llama", "--until", "200",
                 "--out", str(out)]) == 0
    assert "24 served steps" in capsys.readouterr().out
    prof = load_profile(out)
    a, b, c = prof.coeffs("small-llama", 1).decode_small
    assert a + 16 * c + b * 16 * 512 == pytest.approx(1.5 + 1.6, rel=0.05)  # batch 16, padded to 512 keys
    assert prof.metadata["served_fit"]["decode_shapes"] == 4
    # decode-worker logs: the steps before a batch grew are the landing's, fitted apart
    assert main(["fit-served", str(log), "--profile", str(base), "--model", "small-llama", "--until", "200",
                 "--split-joins", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KV landing:" in printed and "measured shape tables: 4 prefill" not in printed  # 3 records a shape < 10
    assert load_profile(out).metadata["served_fit"]["decode_joined_steps"] > 0
    assert main(["fit-served", str(log), "--profile", str(base), "--model", "small-llama", "--since", "400",
                 "--out", str(out)]) == 2
    assert "need 3 of each" in capsys.readouterr().err


def test_cli_and_planner_stay_jax_free():
    """Only the `profile` command imports jax (dsjax/bench/profiler.py, imported on demand)."""
    import subprocess
    import sys

    code = (
        "import sys; import dsjax.plan, dsjax.planner, dsjax.workloads.trace_gen, dsjax.planner.served, serving.step_log,"
        " dsjax.workloads.trace_gen;"
        "bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
