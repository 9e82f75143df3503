"""Reporting of a finished `compare` experiment: plots, summary.md, and the re-rendering of a
saved run directory (`python -m dsjax.bench report DIR`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from dsjax.bench.analysis import SLOs, mean_breakdown, read_run, slo_scale_curve
from dsjax.bench.plots import plot_attainment_vs_rate, plot_attainment_vs_slo_scale, plot_latency_breakdown
from dsjax.bench.sweep import SweepResult


def render(out: Path, sweeps: dict[str, SweepResult], summary: dict) -> None:
    """The plots and summary.md of a finished experiment (also `python -m dsjax.bench report DIR`)."""
    c, slo = summary["config"], summary["slo"]
    slos = SLOs(ttft_s=slo["ttft_s"], tpot_s=slo["tpot_s"], target=slo["target"])
    ref = summary["reference_rate"]
    title = f"{c['model']}, {c['workload']} /{c['scale']:g}, TTFT {slos.ttft_s * 1e3:.0f} ms, TPOT {slos.tpot_s * 1e3:.1f} ms"
    plot_attainment_vs_rate({s: sw.full_rows() for s, sw in sweeps.items()}, out / "attainment_vs_rate.png",
                            target=slos.target, goodputs={s: sw.goodput for s, sw in sweeps.items()},
                            per_device={s: summary["systems"][s]["num_devices"] for s in sweeps}, title=title)
    curves = {s: slo_scale_curve(run.records, slos) for s, sw in sweeps.items() if (run := sw.run_at(ref)) is not None}
    plot_attainment_vs_slo_scale(curves, out / "attainment_vs_slo_scale.png", target=slos.target,
                                 title=f"{title}; {ref:g} req/s")
    # Bars at the reference rate and the next scan rate above it (where the systems start to differ).
    above = [r for r in c["rates"] if r > ref]
    bars = {}
    for s, sw in sweeps.items():
        for rate in [ref] + above[:1]:
            run = sw.run_at(rate)
            if run is not None and not run.stopped_early:
                bars[f"{s[:6]} @ {rate:g}"] = mean_breakdown(run)
    plot_latency_breakdown(bars, out / "latency_breakdown.png", title=f"mean per request (req/s); {title}")
    (out / "summary.md").write_text(summary_markdown(summary))


def rerender(out: str | Path) -> dict:
    """Re-draws the plots and summary.md of an experiment directory from its saved files."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "results.json").read_text())
    sweeps = {}
    for system, info in summary["systems"].items():
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        runs = tuple(read_run(out / f"requests-{system}-{r['rate']:.4g}.jsonl", r) for r in mine)
        sweeps[system] = SweepResult(label=system, goodput=info["goodput"], saturated=info["saturated"],
                                     probes=tuple(tuple(p) for p in info["probes"]), runs=runs, rows=tuple(mine))
    render(out, sweeps, summary)
    return summary


def summary_markdown(summary: dict) -> str:
    """The headline table and the fidelity table as markdown."""
    slo = summary["slo"]
    rule = (f"3.5 x {slo['prefill_512_ms']:.2f} ms" if "prefill_512_ms" in slo else slo.get("rule", "given"),
            f"5 x {slo['decode_bs1_ctx512_ms']:.3f} ms" if "decode_bs1_ctx512_ms" in slo else slo.get("rule", "given"))
    lines = [
        f"SLOs: TTFT {slo['ttft_s'] * 1e3:.1f} ms = {rule[0]}, TPOT {slo['tpot_s'] * 1e3:.2f} ms = {rule[1]}; "
        f"attainment target {slo['target']:.0%}",
        "",
        "| system | devices | goodput (req/s) | per-device goodput | simulated per-device | tightest SLO scale @ "
        f"{summary['reference_rate']:g} req/s |",
        "|---|---|---|---|---|---|",
    ]
    for s, d in summary["systems"].items():
        scale = summary["tightest_slo_scale_at_reference_rate"].get(s)
        lines.append(f"| {s} | {d['num_devices']} | {d['goodput']:.3g}{'+' if d['saturated'] else ''} | "
                     f"{d['per_device_goodput']:.3g} | {d['simulated_per_device_goodput']:.3g} | "
                     f"{'n/a' if scale is None else f'{scale:.2f}'} |")
    for k, v in summary["ratios"].items():
        shown = f"**{v:.2f}x**" if v is not None and math.isfinite(v) else "n/a (the baseline has no goodput)"
        lines.append(f"\n{k.replace('_', ' ')}: {shown} per-device goodput")
    emu = summary.get("emulation")
    if emu:
        lines += ["", f"Emulated cluster: {summary['devices']} devices ({emu['cluster']['profile_path']}); placements "
                  "by the planner; largest |measured - simulated| attainment over every full run: "
                  f"**{summary['max_attainment_gap_points']:.1f} points**", ""]
        lines += [f"- {s}: {d['placement_text']}, gap {d['max_attainment_gap_points']:.1f} points over "
                  f"{len(d['rates'])} rates; with TTFT taken at the engine (scheduler only, no router or client): "
                  f"{_num(d.get('max_engine_side_gap_points'), 1):.1f} points; with the router's arrival times "
                  f"replayed (no client): {_num(d.get('max_arrival_replay_gap_points'), 1):.1f} points"
                  for s, d in emu["systems"].items() if d["max_attainment_gap_points"] is not None]
        lines += ["", "TTFT parts, ms, request against request (p50/p90), except: *quantiles* = engine p50/p90 minus "
                  "the simulator's p50/p90; *sim noise* = the simulator against itself with arrivals moved <= 1 ms "
                  "(the paired columns' floor)", "",
                  "| system | rate | real | simulated | engine-side | engine - sim | engine - sim mean | quantiles | "
                  "sim noise | router - engine | client - router |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in summary["fidelity"]:
            mean = f.get("ttft_engine_minus_sim_mean_ms")
            ms = [("/".join(f"{x:.1f}" for x in f[k]) if f.get(k) else "") for k in ("ttft_engine_minus_sim_ms",)]
            ms += ["" if mean is None else f"{mean:.1f}"]
            ms += [("/".join(f"{x:.1f}" for x in f[k]) if f.get(k) else "") for k in
                   ("ttft_engine_vs_sim_quantiles_ms", "ttft_sim_noise_ms", "ttft_router_minus_engine_ms",
                    "ttft_client_minus_router_ms")]
            eng = f.get("engine_side_attainment")
            lines.append(f"| {f['system']} | {f['rate']:g} | {f['real']:.1%} | {f['simulated']:.1%} | "
                         f"{'' if eng is None else format(eng, '.1%')} | " + " | ".join(ms) + " |")
    served = any("served_simulated" in f for f in summary["fidelity"])
    if served:
        lines += ["", "Served calibration (simulator fitted on each system's warm-up steps; the measured runs are not used):", "",
                  "| system | warm-up steps | prefill / decode shapes | median fit error prefill / decode | "
                  "KV transfer: fixed (ms) + bytes at (MB/s) | served-sim per-device goodput |", "|---|---|---|---|---|---|"]
        for s, d in summary["systems"].items():
            i = d.get("served_calibration")
            if i:
                lines.append(f"| {s} | {i['steps_in_window']} | {i['prefill_shapes']} / {i['decode_shapes']} | "
                             f"{i['prefill_median_rel_err']:.0%} / {i['decode_median_rel_err']:.0%} | "
                             f"{i['transfer_fixed_s'] * 1e3:.1f} + "
                             f"{'-' if not i.get('link_bytes_per_s') else format(i['link_bytes_per_s'] / 1e6, '.0f')} | "
                             f"{d['served_simulated_per_device_goodput']:.3g} |")
    variants = [v for v in _VARIANTS if any(f"{v}_simulated" in f for f in summary["fidelity"])]
    head = ("| system | rate (req/s) | real attainment | sim (runner profile) | diff | "
            + ("sim (served) | diff | " if served else "")
            + "".join(f"sim ({_VARIANTS[v]}) | diff | " for v in variants)
            + ("same-run speed prefill / decode | " if "same_run" in variants else "")
            + "real TTFT / TPOT att. | sim TTFT / TPOT att. | TTFT p90 real / sim (s) | TPOT p90 real / sim (ms) |")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for f in summary["fidelity"]:
        # with the served calibration the sim columns on the right are the served simulator's
        sim_ttft, sim_tpot, sim_ttft_p90, sim_tpot_p90 = (
            (f["served_sim_ttft"], f["served_sim_tpot"], f.get("served_sim_ttft_p90_s"), f.get("served_sim_tpot_p90_s"))
            if "served_simulated" in f else (f["sim_ttft"], f["sim_tpot"], f.get("sim_ttft_p90_s"), f.get("sim_tpot_p90_s")))
        cells = [f["system"], f"{f['rate']:g}", f"{f['real']:.1%}", f"{f['simulated']:.1%}", f"{f['diff_points']:+.1f}"]
        if served:
            cells += ([f"{f['served_simulated']:.1%}", f"{f['served_diff_points']:+.1f}"] if "served_simulated" in f else ["", ""])
        for v in variants:
            cells += ([f"{f[f'{v}_simulated']:.1%}", f"{f[f'{v}_diff_points']:+.1f}"] if f"{v}_simulated" in f else ["", ""])
        if "same_run" in variants:
            sf = f.get("same_run_speed_factors")
            cells.append(f"{sf['prefill']:.2f} / {sf['decode']:.2f}" if sf else "")
        cells += [f"{f['real_ttft']:.0%} / {f['real_tpot']:.0%}", f"{sim_ttft:.0%} / {sim_tpot:.0%}",
                  f"{_num(f.get('real_ttft_p90_s'), 1):.3f} / {_num(sim_ttft_p90, 1):.3f}",
                  f"{_num(f.get('real_tpot_p90_s'), 1e3):.1f} / {_num(sim_tpot_p90, 1e3):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    within = summary.get("fidelity_rows_within_3_points")
    if within:
        names = {"": "runner profile", "served_": "served", **{f"{v}_": label for v, label in _VARIANTS.items()}}
        shown = {k: v for k, v in within.items()
                 if k in names and any(f"{k}diff_points" in f for f in summary["fidelity"])}  # variants the run had
        lines += ["", "Rows within 3 points: " + ", ".join(
            f"{names[k]} {v}/{summary['fidelity_rows']}" for k, v in shown.items())]
    return "\n".join(lines) + "\n"


# The served simulator rescaled to the machine's speed over a window (experiment._rescaled_sims).
_VARIANTS = {"recent": "served, recent speed", "probe": "served, probe speed",
             "same_run": "served, same-run speed: diagnostic"}


def _num(value: float | None, scale: float) -> float:
    return math.nan if value is None else value * scale


def copy_plots(out: Path, img_dir: Path, prefix: str) -> list[Path]:
    """Copies the run's PNGs to docs/img/<prefix>-*.png."""
    img_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for png in sorted(Path(out).glob("*.png")):
        dest = img_dir / f"{prefix}-{png.name}"
        shutil.copyfile(png, dest)
        copied.append(dest)
    return copied
