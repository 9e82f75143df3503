"""The paper-scale table: several `compare --emulate` outputs side by side with what the planner
predicted for the same placements and with DistServe's published gains.

    python -m dsjax.bench paper-table OUT_DIR[+OUT_DIR...] [...] [--md table.md] [--png table.png]

An experiment measured system by system (`compare --emulate ... --systems X --rates R`, one output
directory each) is one row: join its directories with `+`. They must be the same experiment (model,
workload, devices, SLOs, run kind), and each system measured in only one of them.

Per experiment (one compare output directory, or several joined): per-device goodput measured through the real
router for each system, the planner's prediction of it (its own 60-s traces, the placement it
chose), the measured and predicted ratios of disaggregated over each baseline, the simulator's
largest attainment gap on the very traces sent, the wall time, and the simulator's steady-state
ratios (dsjax/bench/steadystate.py; runs of 12 request lifetimes, where a short run from an empty
server flatters every system). The plot draws, per experiment, the measured ratio of disaggregated
over colocated (same profile) and over vLLM-priced colocated, the planner's prediction of each, the
steady-state ratio over vLLM-priced, and the paper's reported gain over vLLM.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# DistServe's gains in rate over vLLM at 90% attainment (OSDI section 6.2), by (model, workload):
# (low, high) for the chatbot range, one number otherwise.
PAPER_GAIN_OVER_VLLM: dict[tuple[str, str], tuple[float, float]] = {
    ("opt-66b", "humaneval"): (5.7, 5.7),
    ("opt-66b", "longbench"): (4.3, 4.3),
    ("opt-66b", "sharegpt"): (2.0, 4.6),
    ("opt-13b", "sharegpt"): (2.0, 4.6),
}
BASELINES = ("colocated", "chunked", "vllm")


def experiment_row(out: Path | str) -> dict[str, Any]:
    """One experiment as a row of the table: a compare --emulate output directory, or several
    joined with `+` (one system or more measured in each)."""
    parts = [_one_output(Path(d)) for d in str(out).split("+")]
    row = parts[0]
    for other in parts[1:]:
        for key in ("model", "workload", "devices", "slo", "steady_runs"):
            if other[key] != row[key]:
                raise ValueError(f"{other['dir']} is not the same experiment as {row['dir']}: "
                                 f"{key} {other[key]!r} vs {row[key]!r}")
        if twice := set(other["measured"]) & set(row["measured"]):
            raise ValueError(f"{', '.join(sorted(twice))} measured in both {row['dir']} and {other['dir']}")
        for key in ("measured", "planned", "placements", "steady"):
            row[key] = {**row[key], **other[key]}
        row["saturated"] += other["saturated"]
        row["dir"] += "+" + other["dir"]
        gaps = [g for g in (row["max_attainment_gap_points"], other["max_attainment_gap_points"]) if g is not None]
        row["max_attainment_gap_points"] = max(gaps) if gaps else None
        walls = [w for w in (row["wall_s"], other["wall_s"]) if w is not None]
        row["wall_s"] = sum(walls) if walls else None
    measured, planned, steady = row["measured"], row["planned"], row["steady"]
    for base in BASELINES:
        if "disaggregated" in measured and base in measured:
            row[f"ratio_{base}"] = _ratio(measured["disaggregated"], measured[base])
            row[f"planned_ratio_{base}"] = _ratio(planned["disaggregated"], planned[base])
        if "disaggregated" in steady and base in steady:  # as steadystate.steady_summary's ratios
            row[f"steady_ratio_{base}"] = _ratio(steady["disaggregated"], steady[base])
    del row["steady"]
    return row


def _one_output(out: Path) -> dict[str, Any]:
    s = json.loads((out / "summary.json").read_text())
    if "emulation" not in s:
        raise ValueError(f"{out} is not a `compare --emulate` output (no 'emulation' in its summary.json)")
    cfg, emu = s["config"], s["emulation"]["systems"]
    steady = s.get("steady_state", {})
    return {
        "dir": str(out), "model": cfg["model"], "workload": cfg["workload"], "devices": s["devices"],
        "slo": [s["slo"]["ttft_s"], s["slo"]["tpot_s"]], "measured": dict(s["per_device_goodput"]),
        "planned": {k: v["planner_goodput"] / v["num_devices"] for k, v in emu.items()},
        "placements": {k: v["placement_text"] for k, v in emu.items()},
        "max_attainment_gap_points": s.get("max_attainment_gap_points"), "wall_s": s.get("wall_s"),
        "saturated": [k for k, v in s["systems"].items() if v.get("saturated")],
        "paper_gain_over_vllm": PAPER_GAIN_OVER_VLLM.get((cfg["model"], cfg["workload"])),
        "steady_runs": bool(s["emulation"].get("steady_state_runs")),
        # the simulator's steady-state goodput per device of each system
        "steady": {k: v["per_device_goodput"] for k, v in steady.get("systems", {}).items()},
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _g(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| experiment | per-device goodput, measured (planner): disagg / colocated / chunked / vLLM-priced "
             "| disagg ÷ colocated (planner) | disagg ÷ vLLM-priced (planner) | steady state, simulated: ÷ colocated / "
             "÷ vLLM-priced | paper, ÷ vLLM | max gap, points | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # a system that passed every scan rate: its goodput is a lower bound (and a ratio over it an upper one)
        low = set(r["saturated"])
        cells = " / ".join(f"{'≥' if s in low else ''}{_g(r['measured'].get(s))} ({_g(r['planned'].get(s))})"
                           if s in r["measured"] else "—" for s in ("disaggregated", *BASELINES))

        def bound(base: str) -> str:
            if r.get(f"ratio_{base}") is None:
                return ""
            if "disaggregated" in low and base not in low:
                return "≥"
            return "≤" if base in low and "disaggregated" not in low else ""

        paper = r["paper_gain_over_vllm"]
        paper_text = "—" if paper is None else (f"{paper[0]:g}×" if paper[0] == paper[1] else f"{paper[0]:g}–{paper[1]:g}×")
        gap, wall = r["max_attainment_gap_points"], r["wall_s"]
        lines.append(
            f"| {r['model'].upper()} {r['workload']}, {r['devices']}{' (steady-state runs)' if r['steady_runs'] else ''} ({r['slo'][0]:g} / {r['slo'][1]:g} s) | {cells} "
            f"| {bound('colocated')}{_x(r.get('ratio_colocated'))} ({_x(r.get('planned_ratio_colocated'))}) "
            f"| {bound('vllm')}{_x(r.get('ratio_vllm'))} ({_x(r.get('planned_ratio_vllm'))}) "
            f"| {_x(r.get('steady_ratio_colocated'))} / {_x(r.get('steady_ratio_vllm'))} | {paper_text} "
            f"| {'—' if gap is None else f'{gap:.1f}'} | {'—' if wall is None else f'{wall / 60:.1f} min'} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    series = [("ratio_colocated", "measured ÷ colocated", "#1f77b4", None),
              ("planned_ratio_colocated", "planner ÷ colocated", "#1f77b4", "//"),
              ("ratio_vllm", "measured ÷ vLLM-priced", "#d62728", None),
              ("planned_ratio_vllm", "planner ÷ vLLM-priced", "#d62728", "//"),
              ("steady_ratio_vllm", "steady state (simulated) ÷ vLLM-priced", "#d62728", "..")]
    fig = Figure(figsize=(max(6.0, 2.2 * len(rows)), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.8 / (len(series) + 1)
    for i, (key, label, color, hatch) in enumerate(series):
        vals = [r.get(key) or 0.0 for r in rows]
        ax.bar(x + i * width, vals, width, label=label, color=color if hatch is None else "white", edgecolor=color,
               hatch=hatch)
    lo = [(r["paper_gain_over_vllm"] or (0, 0))[0] for r in rows]
    hi = [(r["paper_gain_over_vllm"] or (0, 0))[1] for r in rows]
    px = x + len(series) * width
    ax.bar(px, hi, width, color="#999999", label="paper ÷ vLLM (range)")
    ax.bar(px, lo, width, color="#555555")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x + 2.5 * width, [f"{r['model'].upper()}\n{r['workload']}, {r['devices']}" + ("\nsteady-state runs" if r["steady_runs"] else "")
                                        for r in rows])
    ax.set_ylabel("per-device goodput of disaggregated ÷ baseline")
    ax.set_title("Emulated devices, real router: measured, planner, paper", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m dsjax.bench paper-table", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="compare --emulate output directories; join one experiment's with +")
    p.add_argument("--md", type=Path, default=None, help="write the markdown table here (default: print it)")
    p.add_argument("--png", type=Path, default=None, help="draw the ratios here")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = [experiment_row(d) for d in args.dirs]
    text = markdown(rows)
    if args.md:
        args.md.write_text(text)
    print(text, end="")
    if args.png:
        print(f"plot: {plot(rows, args.png)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0
