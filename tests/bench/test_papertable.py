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
    doc["steady_state"] = {"systems": {"disaggregated": {"per_device_goodput": 0.7}, "colocated": {"per_device_goodput": 0.7 / 1.14},
                                       "vllm": {"per_device_goodput": 0.4}}}
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


def _one_system(out, system, *, goodput, devices, steady, saturated=True, model="opt-66b", wall=300.0, gap=1.0):
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({
        "config": {"model": model, "workload": "humaneval"}, "devices": 32, "wall_s": wall,
        "slo": {"ttft_s": 0.125, "tpot_s": 0.2}, "max_attainment_gap_points": gap,
        "per_device_goodput": {system: goodput}, "systems": {system: {"saturated": saturated}},
        "emulation": {"steady_state_runs": True,
                      "systems": {system: {"planner_goodput": goodput * devices, "num_devices": devices,
                                           "placement_text": f"{system} placement"}}},
        "steady_state": {"systems": {system: {"per_device_goodput": steady}}},
    }))
    return str(out)


def test_an_experiment_measured_system_by_system_is_one_row(tmp_path, capsys):
    d = _one_system(tmp_path / "d", "disaggregated", goodput=1.8, devices=24, steady=2.1, gap=1.7, wall=600.0)
    c = _one_system(tmp_path / "c", "colocated", goodput=1.5, devices=32, steady=1.7, gap=2.4, wall=500.0)
    v = _one_system(tmp_path / "v", "vllm", goodput=0.45, devices=32, steady=0.5, gap=1.0, wall=400.0)
    rows = tmp_path / "rows.json"
    assert main(["paper-table", f"{d}+{c}+{v}", "--json", str(rows)]) == 0
    text = capsys.readouterr().out
    row = json.loads(rows.read_text())[0]
    assert row["ratio_colocated"] == pytest.approx(1.2) and row["ratio_vllm"] == pytest.approx(4.0)
    assert row["steady_ratio_colocated"] == pytest.approx(2.1 / 1.7) and row["steady_ratio_vllm"] == pytest.approx(4.2)
    assert row["max_attainment_gap_points"] == pytest.approx(2.4) and row["wall_s"] == pytest.approx(1500.0)
    assert sorted(row["saturated"]) == ["colocated", "disaggregated", "vllm"]
    assert "≥1.8 (1.8) / ≥1.5 (1.5) / — / ≥0.45 (0.45)" in text and "25.0 min" in text
    assert text.count("\n| OPT-66B") == 1


def test_joined_outputs_must_be_one_experiment_each_system_once(tmp_path, capsys):
    d = _one_system(tmp_path / "d", "disaggregated", goodput=1.8, devices=24, steady=2.1)
    d2 = _one_system(tmp_path / "d2", "disaggregated", goodput=1.9, devices=24, steady=2.1)
    other = _one_system(tmp_path / "o", "colocated", goodput=1.5, devices=32, steady=1.7, model="opt-13b")
    assert main(["paper-table", f"{d}+{d2}"]) == 2
    assert "disaggregated measured in both" in capsys.readouterr().err
    assert main(["paper-table", f"{d}+{other}"]) == 2
    assert "not the same experiment" in capsys.readouterr().err
