"""`python -m dsjax.bench paper-table` (dsjax/bench/papertable.py): compare --emulate outputs as
one table beside the planner's predictions and the paper's gains."""

import json

import pytest

from dsjax.bench.cli import main


def _summary(out, *, disagg, colo, vllm, planner):
    out.mkdir(parents=True)
    systems = {"disaggregated": disagg, "colocated": colo, "vllm": vllm}
    devices = {"disaggregated": 24, "colocated": 32, "vllm": 32}
    (out / "summary.json").write_text(json.dumps({
        "config": {"model": "opt-66b", "workload": "humaneval"}, "devices": 32, "wall_s": 600.0,
        "slo": {"ttft_s": 0.125, "tpot_s": 0.2}, "max_attainment_gap_points": 1.5,
        "per_device_goodput": systems,
        "systems": {k: {"saturated": False} for k in systems},
        "emulation": {"systems": {k: {"planner_goodput": planner[k] * devices[k], "num_devices": devices[k],
                                      "placement_text": f"{k} placement"} for k in systems}},
    }))
    return out


def test_table_ratios_and_plot(tmp_path, capsys):
    d = _summary(tmp_path / "he", disagg=1.6, colo=1.6, vllm=0.4, planner={"disaggregated": 1.67, "colocated": 1.79,
                                                                           "vllm": 0.422})
    rows = tmp_path / "rows.json"
    assert main(["paper-table", str(d), "--png", str(tmp_path / "t.png"), "--json", str(rows)]) == 0
    text = capsys.readouterr().out
    assert "| OPT-66B humaneval, 32 (0.125 / 0.2 s) |" in text and "5.7×" in text and "10.0 min" in text
    row = json.loads(rows.read_text())[0]
    assert row["ratio_colocated"] == pytest.approx(1.0) and row["ratio_vllm"] == pytest.approx(4.0)
    assert row["planned_ratio_vllm"] == pytest.approx(1.67 / 0.422)
    assert "1.00× (0.93×)" in text and "4.00× (3.96×)" in text
    assert (tmp_path / "t.png").stat().st_size > 5000
    assert "| — / — |" in text  # an output without the steady-state block


def test_steady_state_ratios_are_a_column(tmp_path, capsys):
    d = _summary(tmp_path / "sg", disagg=0.7, colo=0.6, vllm=0.4, planner={"disaggregated": 0.6, "colocated": 0.55,
                                                                           "vllm": 0.35})
    doc = json.loads((d / "summary.json").read_text())
    doc["steady_state"] = {"disaggregated_over_colocated_ratio": 1.14, "disaggregated_over_vllm_ratio": 1.75}
    doc["emulation"]["steady_state_runs"] = True
    (d / "summary.json").write_text(json.dumps(doc))
    assert main(["paper-table", str(d)]) == 0
    text = capsys.readouterr().out
    assert "| 1.14× / 1.75× |" in text and "32 (steady-state runs) (" in text


def test_a_cpu_compare_output_is_refused(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"config": {}}))
    assert main(["paper-table", str(tmp_path)]) == 2
    assert "not a `compare --emulate` output" in capsys.readouterr().err


def test_a_baseline_that_passed_every_rate_is_a_bound(tmp_path, capsys):
    d = _summary(tmp_path / "lb", disagg=0.34, colo=0.28, vllm=0.2, planner={"disaggregated": 0.33, "colocated": 0.24,
                                                                             "vllm": 0.17})
    doc = json.loads((d / "summary.json").read_text())
    doc["systems"]["colocated"]["saturated"] = True
    (d / "summary.json").write_text(json.dumps(doc))
    assert main(["paper-table", str(d)]) == 0
    text = capsys.readouterr().out
    assert "≥0.28 (0.24)" in text and "≤1.21×" in text and "| 1.70×" in text
