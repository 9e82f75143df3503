"""The planner's fidelity over repeated `compare` runs: measured vs simulated attainment per rate.

    python -m dsjax.bench fidelity bench-results/fid1 bench-results/fid2 bench-results/fid3 \
        [--out fidelity.md] [--plot fidelity.png]

One `compare` run gives one measured attainment per (system, rate). Near a knee that number is
not reproducible on a shared CPU host: three runs of the same trace at the same rate measured
61.5%, 86.5% and 93% (docs/results.md). So the simulator is judged against the *mean* over
repeated runs, with the spread of the runs beside it.

For every run directory this re-fits the served calibration from that run's own warm-up step logs
with the current code (so every run is judged by one simulator, whatever code wrote it), then
simulates each measured run (not stopped early) with the calibration rescaled over these windows
(experiment._rescaled_sims):

    served     the warm-up fit alone (a prediction: nothing after the warm-up is used)
    recent     rescaled to the 30 s of steps before the run (a prediction)
    probe      rescaled to the speed probe at the run's rate just before it (a prediction; only
               runs made with --speed-probe)
    same_run   rescaled to the run's own steps (a diagnostic: the run's step times, never its
               attainment)

and tabulates every (system, rate) that all the runs measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsjax.bench.experiment import speed_windows

VARIANTS = ("served", "recent", "probe", "same_run")


def simulate_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per measured full run of `out_dir`: system, rate, real attainment and the
    attainment of every simulator variant that applies."""
    from dsjax.bench.analysis import SLOs
    from dsjax.bench.loadgen import send_schedule
    from dsjax.bench.prompts import load_bench_requests
    from dsjax.bench.simcompare import TraceSimulator, served_calibration, speed_scaled, step_records
    from dsjax.planner.latency import load_profile

    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "results.json").read_text())
    c, slo = summary["config"], summary["slo"]
    slos = SLOs(ttft_s=slo["ttft_s"], tpot_s=slo["tpot_s"], target=slo["target"])
    requests = load_bench_requests(c["workload"], num_requests=c["num_requests"], seed=c["seed"], scale=c["scale"],
                                   prompt_format=c["prompt_format"])
    base = load_profile(summary["profile"])
    sim_kw = dict(model=c["model"], slos=slos, max_num_seqs=c["server"]["max_num_seqs"],
                  max_prefill_tokens=c["server"]["max_prefill_tokens"])
    found = []
    for system, info in summary["systems"].items():
        logs = out / "logs" / f"steps-{system}"
        fitted = info.get("served_calibration")
        if not fitted or not info.get("warmup_window") or not logs.is_dir():
            continue
        cal = served_calibration(step_log_dir=logs, window=tuple(info["warmup_window"]), base=base, model=c["model"],
                                 disaggregated=system == "disaggregated")
        # the transfer fit needs the warm-up's requests, which are not saved: keep the run's own
        cal = dataclasses.replace(cal, transfer_fixed_s=fitted["transfer_fixed_s"],
                                  link_bytes_per_s=fitted["link_bytes_per_s"])
        probes = {float(r): (s, e) for r, s, e in info.get("speed_probe_windows", [])}
        records = step_records(logs)
        for row in rows:
            if row["system"] != system or row["stopped_early"] or not math.isfinite(row.get("started_at") or math.nan):
                continue
            start, rate = row["started_at"], float(row["rate"])
            windows = speed_windows(start, row["wall_s"], probes.get(rate))
            offsets = send_schedule(len(requests), rate=rate, arrival=c["arrival"], cv=c["cv"], seed=c["seed"])
            entry = {"run": str(out), "system": system, "rate": rate, "real": row["attainment_joint"],
                     "served": TraceSimulator.calibrated(cal, system=system, **sim_kw).run(requests, offsets).attainment}
            for variant, window in windows.items():
                scaled, _ = speed_scaled(cal, records=records, window=window, model=c["model"])
                entry[variant] = TraceSimulator.calibrated(scaled, system=system, **sim_kw).run(requests, offsets).attainment
            found.append(entry)
    return found


@dataclasses.dataclass(frozen=True, kw_only=True)
class FidelityPoint:
    """One (system, rate) over the repeated runs; attainments in [0, 1]."""

    system: str
    rate: float
    real: tuple[float, ...]  # per run
    simulated: dict[str, tuple[float, ...]]  # variant -> per run (only variants every run has)

    @property
    def real_mean(self) -> float:
        return statistics.fmean(self.real)

    @property
    def real_stderr(self) -> float:
        return statistics.stdev(self.real) / math.sqrt(len(self.real)) if len(self.real) > 1 else math.nan

    def diff_points(self, variant: str) -> float:
        """100 x (mean measured - mean simulated)."""
        return 100.0 * (self.real_mean - statistics.fmean(self.simulated[variant]))


def aggregate(runs: Sequence[Sequence[dict[str, Any]]]) -> list[FidelityPoint]:
    """The (system, rate) pairs every run measured, in system then rate order."""
    by_key: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for entries in runs:
        for e in entries:
            by_key[(e["system"], e["rate"])].append(e)
    points = []
    for (system, rate), es in sorted(by_key.items()):
        if len({e["run"] for e in es}) != len(runs) or len(es) != len(runs):
            continue
        sims = {v: tuple(e[v] for e in es) for v in VARIANTS if all(v in e for e in es)}
        points.append(FidelityPoint(system=system, rate=rate, real=tuple(e["real"] for e in es), simulated=sims))
    return points


def markdown(points: Sequence[FidelityPoint]) -> str:
    variants = [v for v in VARIANTS if points and all(v in p.simulated for p in points)]
    head = ("| system | rate (req/s) | measured per run | measured mean (± s.e.) | "
            + "".join(f"{v} mean | diff | " for v in variants)).rstrip()
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        cells = [p.system, f"{p.rate:g}", " / ".join(f"{100 * a:.1f}" for a in p.real),
                 f"{100 * p.real_mean:.1f} ± {100 * p.real_stderr:.1f}"]
        for v in variants:
            cells += [f"{100 * statistics.fmean(p.simulated[v]):.1f}", f"{p.diff_points(v):+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{v} {sum(abs(p.diff_points(v)) <= 3.0 for p in points)}/{len(points)}" for v in variants)
    lines += ["", f"(system, rate) points whose mean simulated attainment is within 3 points of the mean measured one: {counts}"]
    return "\n".join(lines) + "\n"


def plot(points: Sequence[FidelityPoint], path: str | Path, *, title: str = "") -> Path:
    """Per system: every run's measured attainment (dots), their mean (solid) and the simulators'
    means (dashed) against the rate."""
    from matplotlib.figure import Figure

    from dsjax.bench.plots import _save

    systems = sorted({p.system for p in points})
    fig = Figure(figsize=(6.0 * max(len(systems), 1) / 1.4, 3.6))
    variants = [v for v in VARIANTS if points and all(v in p.simulated for p in points)]
    for i, system in enumerate(systems):
        ax = fig.add_subplot(1, len(systems), i + 1)
        pts = [p for p in points if p.system == system]
        rates = [p.rate for p in pts]
        for p in pts:
            ax.plot([p.rate] * len(p.real), [100 * a for a in p.real], "o", color="0.6", ms=3)
        ax.plot(rates, [100 * p.real_mean for p in pts], "-", color="black", label="measured (mean)")
        for v in variants:
            ax.plot(rates, [100 * statistics.fmean(p.simulated[v]) for p in pts], "--", label=f"sim: {v}")
        ax.axhline(90, color="0.8", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("rate (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_title(f"{system}{': ' + title if title else ''}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)
