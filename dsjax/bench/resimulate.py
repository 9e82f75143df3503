"""Replay an emulated compare's runs through the current simulator (no servers started).

    python -m dsjax.bench resimulate bench-results/sg-66b-32-steady-s13 [--prefill-cap 64] \
        [--rates-around 0.98,1.02] [--systems disaggregated] [--json out.json]

An emulated run's gap to the simulator is a difference between the simulator's model of the
scheduler and the real one (docs/results.md, "Paper-scale experiments"). When the simulator's model
changes, this judges the change against runs already made: it rebuilds each system's simulator from
the run's summary.json (the cluster, the placement, the SLOs, the run and settle lengths), replays
the very sample and send offsets each measured rate used, and prints the measured attainment, the
simulator's attainment recorded by the run and the current simulator's, with the gap read as a rate
(`emufidelity.rate_equivalent`). `--prefill-cap N` models the router's cap on Prefill calls a prefill
instance holds (SimConfig.prefill_max_inflight; 0: no cap); `--rates-around` adds the current
simulator's attainment at those multiples of each rate (how steep the curve is there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any


def rebuild(out_dir: str | Path) -> dict[str, Any]:
    """What a replay of `out_dir`'s runs needs: the cluster, the SLOs, the sample, a function from
    rate to send offsets (as the run made them), the settle time and the summary."""
    from dsjax.bench.analysis import SLOs
    from dsjax.bench.emucompare import MIN_RUN_REQUESTS, sized_schedule
    from dsjax.bench.emulated_setup import EmulatedCluster
    from dsjax.bench.prompts import load_bench_requests
    from dsjax.bench.sweep import SweepConfig

    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    c, slo, em = summary["config"], summary["slo"], summary.get("emulation")
    if not em or "run_seconds" not in em:
        raise ValueError(f"{out_dir} is not an emulated compare run (no emulation.run_seconds in summary.json)")
    fields = {f.name for f in dataclasses.fields(EmulatedCluster)}
    kw = {k: v for k, v in em["cluster"].items() if k in fields}
    kw["profile_path"] = Path(kw["profile_path"])
    kw["baseline_profile"] = kw.get("baseline_profile") and Path(kw["baseline_profile"])
    requests = load_bench_requests(c["workload"], num_requests=c["num_requests"], seed=c["seed"], scale=c["scale"],
                                   prompt_format=c["prompt_format"], source_limit=c.get("source_limit"))
    sweep = SweepConfig(rates=(1.0,), arrival=c["arrival"], cv=c["cv"], seed=c["seed"], duration_s=em["run_seconds"],
                        settle_s=em["settle_s"], min_requests=MIN_RUN_REQUESTS, warmup_requests=0)
    return {"summary": summary, "cluster": EmulatedCluster(**kw), "requests": requests,
            "schedule": sized_schedule(sweep, len(requests)), "settle_s": em["settle_s"],
            "slos": SLOs(ttft_s=slo["ttft_s"], tpot_s=slo["tpot_s"], target=slo["target"])}


def resimulate(out_dir: str | Path, *, prefill_cap: int | None = None, around: tuple[float, ...] = (),
               systems: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One row per measured (system, rate) of `out_dir`: measured, recorded and current simulated
    attainment, the gap in points and as a rate, and the current simulator at `around` x the rate."""
    from dsjax.bench.emucompare import trace_simulator
    from dsjax.bench.emufidelity import attainment, rate_gap
    from dsjax.engine.placement import Placement

    run = rebuild(out_dir)
    cluster, requests, schedule = run["cluster"], run["requests"], run["schedule"]
    config = dataclasses.replace(cluster.sim_config(), prefill_max_inflight=prefill_cap)
    rows, sims = [], {}
    for f in run["summary"]["fidelity"]:
        system, rate = f["system"], f["rate"]
        if systems and system not in systems:
            continue
        if system not in sims:
            placement = Placement.from_dict(run["summary"]["emulation"]["systems"][system]["placement"])
            sims[system] = trace_simulator(cluster, system, placement, run["slos"], run["settle_s"], config)
        sim = sims[system]
        now = attainment(sim, requests, schedule(rate))
        rows.append({"system": system, "rate": rate, "real": f["real"], "simulated_recorded": f["simulated"],
                     "simulated_now": now, "gap_points": 100 * (f["real"] - now),
                     **rate_gap(f["real"], now, sim, requests, schedule, rate),
                     "around": {k: attainment(sim, requests, schedule(rate * k)) for k in around}})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    around = sorted({k for r in rows for k in r["around"]})
    head = ["system", "rate", "measured", "simulated (run)", "simulated (now)", "gap, points", "gap as a rate"]
    head += [f"now at {k:g}x" for k in around]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        as_rate = f"{r['rate_equivalent_gap_pct']:+.1f}%" + (" or more" if r.get("rate_equivalent_beyond_span") else "")
        cells = [r["system"], f"{r['rate']:g}", f"{100 * r['real']:.1f}", f"{100 * r['simulated_recorded']:.1f}",
                 f"{100 * r['simulated_now']:.1f}", f"{r['gap_points']:+.1f}", as_rate]
        cells += [f"{100 * r['around'][k]:.1f}" for k in around]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m dsjax.bench resimulate", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="a compare --emulate output directory")
    p.add_argument("--prefill-cap", type=int, default=None,
                   help="model the router's cap on Prefill calls per prefill instance (the servers': 64); default none")
    p.add_argument("--rates-around", default="", help="also simulate at these multiples of each rate, e.g. 0.98,1.02")
    p.add_argument("--systems", default="", help="comma-separated systems (default: all)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    around = tuple(float(x) for x in args.rates_around.split(",") if x.strip())
    systems = tuple(s for s in args.systems.split(",") if s) or None
    rows = resimulate(args.dir, prefill_cap=args.prefill_cap or None, around=around, systems=systems)
    print(markdown(rows), end="")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0
