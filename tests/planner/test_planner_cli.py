import json

from planner_reference import distserve_profile

from dsjax.placement import load_plan
from dsjax.plan import main


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
    assert out["rate"] == 3.0 and out["num_devices"] == 3
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
    line = capsys.readouterr().out.strip()
    assert line.startswith("best: prefill tp=2") and "colocated best" in line and "ratio" in line
    placement, meta = load_plan(out)
    assert placement.mode == "disaggregated" and placement.num_devices <= 4
    for key in ("goodput", "per_device_goodput", "slo", "model", "profile", "colocated", "ratio_vs_colocated"):
        assert key in meta
    assert meta["model"] == "facebook/opt-13b" and meta["slo"]["ttft_s"] == 0.2


def test_bad_arguments_are_reported(capsys):
    argv = ["simulate", "--profile", str(distserve_profile()), "--model", "opt-13b", "--workload", "fixed:100:10",
            "--rate", "1", "--ttft", "1", "--tpot", "1", "--prefill", "tp=2,xx=1"]
    assert main(argv) == 2
    assert "bad phase spec" in capsys.readouterr().err
