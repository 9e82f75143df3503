"""Aggregating repeated runs for the simulator's fidelity table (dsjax/bench/fidelity.py)."""

import pytest

from dsjax.bench.cli import main
from dsjax.bench.fidelity import aggregate, markdown, plot


def _entries(run, reals, sims, probe=True):
    out = []
    for (system, rate), real in reals.items():
        e = {"run": run, "system": system, "rate": rate, "real": real, "served": sims[(system, rate)],
             "recent": sims[(system, rate)], "same_run": real}
        if probe:
            e["probe"] = sims[(system, rate)]
        out.append(e)
    return out


def test_points_are_the_pairs_every_run_measured_with_means_and_spread(tmp_path):
    a = _entries("a", {("colocated", 5.0): 1.0, ("colocated", 14.0): 0.93, ("disaggregated", 14.0): 0.5},
                 {("colocated", 5.0): 1.0, ("colocated", 14.0): 0.90, ("disaggregated", 14.0): 0.4})
    b = _entries("b", {("colocated", 5.0): 0.99, ("colocated", 14.0): 0.615},
                 {("colocated", 5.0): 1.0, ("colocated", 14.0): 0.96}, probe=False)
    points = aggregate([a, b])
    assert [(p.system, p.rate) for p in points] == [("colocated", 5.0), ("colocated", 14.0)]  # b lacks disaggregated
    knee = points[1]
    assert knee.real == (0.93, 0.615) and knee.real_mean == pytest.approx(0.7725)
    assert knee.real_stderr == pytest.approx(0.1575)  # stdev / sqrt(2)
    assert knee.diff_points("served") == pytest.approx(100 * (0.7725 - 0.93))
    assert "probe" not in knee.simulated  # only variants every run has
    text = markdown(points)
    assert "| colocated | 14 | 93.0 / 61.5 | 77.2 ± 15.8 |" in text
    assert "served 1/2" in text and "same_run 2/2" in text and "probe" not in text
    png = plot(points, tmp_path / "f.png", title="2 runs")
    assert png.stat().st_size > 5000


def test_cli_rejects_directories_without_a_compare_run(tmp_path, capsys):
    assert main(["fidelity", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
