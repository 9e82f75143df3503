"""The paper's experiments on emulated devices: `python -m dsjax.bench compare --emulate PROFILE`.

    python -m dsjax.bench compare --emulate profiler-a100-80g.distserve.json --model opt-66b \\
        --workload humaneval --devices 32 --ttft 0.125 --tpot 0.2 [--quick] [--out DIR]

1. Placements for N emulated devices from the planner on the same profile (emulated_setup.py):
   disaggregated by Algorithm 2 (or 1), colocated and chunked as the best single-instance TP/PP
   replicated over the devices.
2. One seeded sample of the real workload at full length (scale 1), sent identically to every
   system; the SLOs given, or DistServe's Table 1 values for the (model, workload).
3. Each system in turn: one `python -m dsjax.serve --emulate` server (the real router, scheduler,
   block manager; every prefill and decode priced by the profile and slept), a rate scan around
   that system's simulated goodput on the runs' traces (all run in full) and a goodput bisection. Every run lasts the
   same time at any rate, its first part settling the server unmeasured (`run_length`).
4. The simulator replays every measured run (same requests, same send times, same placement and
   scheduler limits). With emulated devices there is no step-time noise to explain: a gap is a
   difference between the simulator's model of the scheduler and the real one.
   `max_attainment_gap_points` is the largest |real - simulated| attainment over every full run.
5. summary.json (per-device goodput, ratios, placements, simulated attainment per run, gaps),
   results.json / .csv, plots (attainment vs rate per device, vs SLO scale, latency breakdown,
   measured vs simulated attainment) and summary.md.
6. Beside them, each placement's steady-state goodput and ratios (`steady_state`): quick and full
   runs are a few request lifetimes from an empty server, which flatters systems near their knee
   (steadystate.py). `--steady-state` makes every run that long instead, at two rates a system.
7. `--time-scale K` (slow motion): the servers' devices take K x their modelled time, requests go
   out K x slower and every run is read back at 1/K (sweep.SweepConfig.time_scale), so every rate,
   latency and attainment is the cluster's at full speed, measured with K x less host time per
   emulated second; for clusters whose token rate the host cannot drive at full speed.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any, Callable

from dsjax.bench.analysis import SLOs
from dsjax.bench.emufidelity import extras_summary, fidelity_extras, host_counters
from dsjax.bench.emulated_setup import PAPER_SLOS, EmulatedCluster, describe_placement, launch_emulated, plan_systems
from dsjax.bench.experiment import (
    CompareConfig,
    _machine_busy_s,
    _machine_state,
    _own_cpu_s,
    _summarize,
    _write_outputs,
)
from dsjax.bench.prompts import load_bench_requests
from dsjax.bench.steadystate import STEADY_RATE_FACTORS, steady_run_length, steady_state_goodputs, steady_summary
from dsjax.bench.steadystate import describe as describe_steady
from dsjax.bench.sweep import SweepConfig, SweepResult, sweep_target
from serving.gc_pauses import GCPauses, quiet_gc, restore_gc

# Each system's scan rates: these factors x the simulator's goodput of its placement on the very
# traces the runs send (the planner's, on its own 60-s traces, when that finds none), so every
# system is scanned around its own knee.
EMULATED_RATE_FACTORS = (0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)
QUICK_EMULATED_RATE_FACTORS = (0.7, 0.9, 1.15)
MIN_FIDELITY_RATES = 5
# How long a run lasts, at any rate (sweep.requests_at), from the workload's request lifetime
# L = mean output length x TPOT SLO / 2 (a request decoding at half its SLO): the first `settle`
# seconds load the server without being measured (its queues fill), then `measure` seconds are
# measured. Near its capacity a server's queues grow slowly, so short runs flatter every system
# (docs/results.md, "Run length"; by how much: steadystate.py); the full run is the longer of the two.
QUICK_SETTLE_LIFETIMES, QUICK_MEASURE_LIFETIMES, QUICK_MIN_MEASURE_S = 1.0, 2.0, 20.0
FULL_SETTLE_LIFETIMES, FULL_MEASURE_LIFETIMES, FULL_MIN_MEASURE_S = 2.0, 4.0, 60.0
MIN_RUN_REQUESTS = 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmulatedCompare:
    compare: CompareConfig  # workload, SLOs, sweep settings, out (its server/profile fields are unused)
    cluster: EmulatedCluster
    quick: bool = False
    steady: bool = False  # --steady-state: runs as long as steadystate.steady_run_length, 2 rates a system
    run_seconds: float | None = None  # every run lasts this long (None: from the lifetime, above)
    settle_s: float | None = None  # of which this long is not measured (None: from the lifetime)
    plan_only: bool = False  # --plan-only: placements and simulated goodputs, no server started

    def run_length(self, mean_output_len: float, tpot_slo_s: float) -> tuple[float, float]:
        """(settle_s, run_seconds) of every run."""
        if self.steady:
            default_settle, default_total = steady_run_length(mean_output_len, tpot_slo_s)
            settle = default_settle if self.settle_s is None else self.settle_s
            total = default_total if self.run_seconds is None else self.run_seconds
        else:
            lifetime = mean_output_len * tpot_slo_s / 2
            settle_k, measure_k, min_measure = ((QUICK_SETTLE_LIFETIMES, QUICK_MEASURE_LIFETIMES, QUICK_MIN_MEASURE_S)
                                                if self.quick else
                                                (FULL_SETTLE_LIFETIMES, FULL_MEASURE_LIFETIMES, FULL_MIN_MEASURE_S))
            settle = settle_k * lifetime if self.settle_s is None else self.settle_s
            total = settle + max(min_measure, measure_k * lifetime) if self.run_seconds is None else self.run_seconds
        if not 0 <= settle < total:
            raise ValueError(f"settle_s={settle:g} must be >= 0 and below run_seconds={total:g}")
        return round(settle, 1), round(total, 1)


def emulated_compare(*, quick: bool, cluster: EmulatedCluster, run_seconds: float | None = None,
                     settle_s: float | None = None, steady: bool = False, plan_only: bool = False,
                     **overrides: Any) -> EmulatedCompare:
    """The settings of a full run (7 scan rates per system, 3 bisections) or `quick` (3 rates, 1
    bisection), runs as long as `EmulatedCompare.run_length`; no warm-up (nothing compiles); any
    CompareConfig field overrides (`num_requests` then caps the requests of one run)."""
    base: dict[str, Any] = dict(scale=1.0, num_requests=0, rates_factors=EMULATED_RATE_FACTORS, max_bisections=3,
                                rel_tol=0.05, warmup_requests=0, model=cluster.model)
    if quick:
        base.update(rates_factors=QUICK_EMULATED_RATE_FACTORS, max_bisections=1, rel_tol=0.1)
    if steady:
        base.update(rates_factors=STEADY_RATE_FACTORS, max_bisections=0)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return EmulatedCompare(compare=CompareConfig(**base), cluster=cluster, quick=quick, steady=steady, run_seconds=run_seconds,
                           settle_s=settle_s, plan_only=plan_only)


def scan_rates(planner_goodput: float, factors) -> tuple[float, ...]:
    """`factors` x the planner's goodput, 2 significant figures."""
    if planner_goodput <= 0:
        raise ValueError(f"the planner finds no positive goodput ({planner_goodput}); pass --rates")
    return tuple(sorted({float(f"{f * planner_goodput:.2g}") for f in factors}))


def resolve_slos(cfg: CompareConfig) -> tuple[SLOs, dict[str, Any]]:
    """The given SLOs, else DistServe's for (model, workload)."""
    paper = PAPER_SLOS.get((cfg.model, cfg.workload))
    if cfg.ttft_s is not None and cfg.tpot_s is not None:
        return SLOs(ttft_s=cfg.ttft_s, tpot_s=cfg.tpot_s, target=cfg.target), {"rule": "given"}
    if paper is None:
        raise ValueError(f"no paper SLOs for {cfg.model} on {cfg.workload} (known: {sorted(PAPER_SLOS)}): pass --ttft and --tpot")
    ttft, tpot = cfg.ttft_s or paper[0], cfg.tpot_s or paper[1]
    return SLOs(ttft_s=ttft, tpot_s=tpot, target=cfg.target), {"rule": "DistServe OSDI Table 1", "paper": list(paper)}


def run_emulated_compare(ec: EmulatedCompare, *, log: Callable[[str], None] = print,
                         launcher: Callable[..., Any] = launch_emulated) -> dict[str, Any]:
    """Runs the whole experiment; returns (and writes to out/summary.json) the summary."""
    cfg, cluster = ec.compare, ec.cluster
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    started = _machine_state()
    log(f"machine: load average {started['loadavg_1_5_15']} on {started['cpus']} CPUs at {started['time']}")
    slos, slo_source = resolve_slos(cfg)
    t0 = time.perf_counter()
    lengths = _search_lengths(cfg)
    plans = plan_systems(cluster, lengths, slos, cfg.systems, seed=cfg.seed, progress=False)
    for s, plan in plans.items():
        log(f"[{s}] planner: {describe_placement(plan.placement)}, simulated {plan.planner_goodput:.3g} req/s "
            f"({plan.planner_goodput / plan.num_devices:.3g} per device) in {plan.details['search_s']:.1f} s")
    search_s = time.perf_counter() - t0

    settle_s, run_s = ec.run_length(sum(o for _, o in lengths) / len(lengths), slos.tpot_s)

    def sweep_config(rates: tuple[float, ...]) -> SweepConfig:
        return SweepConfig(rates=rates, arrival=cfg.arrival, cv=cfg.cv, seed=cfg.seed, rel_tol=cfg.rel_tol,
                           max_bisections=cfg.max_bisections, warmup_requests=0, duration_s=run_s, settle_s=settle_s,
                           min_requests=MIN_RUN_REQUESTS, time_scale=cluster.time_scale)

    # One sample, long enough for a run at twice the highest rate the planner's goodput suggests
    # (the scan is placed after the simulator has priced these very traces, below); every system
    # and rate sends its first rate x run_seconds requests.
    planned = {s: scan_rates(plans[s].planner_goodput, cfg.rates_factors) for s in cfg.systems}
    top = max(cfg.rates) if cfg.rates else 2 * max(max(r) for r in planned.values())
    needed = sweep_config((top,)).requests_at(top, 1 << 30)
    requests = load_bench_requests(cfg.workload, num_requests=min(needed, cfg.num_requests or needed), seed=cfg.seed,
                                   scale=cfg.scale, prompt_format=cfg.prompt_format, source_limit=cfg.source_limit)
    schedule = sized_schedule(sweep_config((top,)), len(requests))
    log(f"SLOs: TTFT {slos.ttft_s:g} s, TPOT {slos.tpot_s:g} s ({slo_source['rule']}); {cfg.workload} runs of "
        f"{run_s:g} s, the first {settle_s:g} s not measured (>= {MIN_RUN_REQUESTS} requests, sample of {len(requests)})"
        + ("" if cluster.time_scale == 1 else f"; in slow motion x{cluster.time_scale:g}: {run_s * cluster.time_scale:g} s "
           "of wall time a run, times read back at full speed"))

    sims = {s: trace_simulator(cluster, s, plans[s].placement, slos, settle_s) for s in cfg.systems}
    # The simulator's goodput on the very traces a run sends, bisected around the planner's.
    probe_rates = {s: scan_rates(plans[s].planner_goodput, tuple(2 ** (i / 4) for i in range(-8, 9)))
                   for s in cfg.systems}
    sim_goodput = {s: sims[s].goodput(requests, schedule, probe_rates[s]) for s in cfg.systems}
    steady = _steady_state(ec, sims, requests, schedule, sim_goodput, plans, sum(o for _, o in lengths) / len(lengths),
                           slos.tpot_s, runs=(settle_s, run_s))
    log(describe_steady(steady))
    # Each system is scanned around its knee on these traces (the simulator's goodput on them; the
    # planner's, on its own shorter traces, left the baselines' scans below their knees).
    rates = {s: tuple(cfg.rates) if cfg.rates else scan_rates(sim_goodput[s] or plans[s].planner_goodput, cfg.rates_factors)
             for s in cfg.systems}
    sweep_cfgs = {s: sweep_config(rates[s]) for s in cfg.systems}
    log("simulated goodput on the runs' traces (req/s): " + ", ".join(f"{s} {g:.3g}" for s, g in sim_goodput.items())
        + "; scan rates " + "; ".join(f"{s} {list(r)}" for s, r in rates.items()))
    if ec.plan_only:
        return _plan_only_summary(ec, out, plans, sim_goodput, steady, rates, slos, slo_source, search_s, started,
                                  time.perf_counter() - t_start)

    sweeps: dict[str, SweepResult] = {}
    processes: dict[str, Any] = {}
    # The client is a Python process too: the sample, the plans and the simulators' traces are
    # frozen out of its collector's way, so a full collection does not stop it for tens of ms
    # mid-run, late to send and late to stamp tokens (serving/gc_pauses.py; each system's own
    # pauses are in processes.*.client_gc).
    gc_before = gc.get_threshold()
    quiet_gc()
    for system in cfg.systems:
        t0 = time.perf_counter()
        client_gc = GCPauses().install()
        with launcher(system, plans[system].placement, cluster, out / "logs") as launched:
            ready_s = time.perf_counter() - t0
            cpu0, w0, me0, busy0 = launched.cpu_seconds(), time.perf_counter(), _own_cpu_s(), _machine_busy_s()
            log(f"[{system}] server ready in {ready_s:.1f} s ({describe_placement(plans[system].placement)})")
            sweeps[system] = sweep_target(launched.targets[0], requests, sweep_cfgs[system], slos, label=system,
                                          labels={"devices": launched.num_devices}, out_dir=out, progress=cfg.progress,
                                          log=log, counters=host_counters(launched.targets[0], launched.cluster_token))
            cpu1, w1, me1, busy1 = launched.cpu_seconds(), time.perf_counter(), _own_cpu_s(), _machine_busy_s()
            used = {k: (cpu1[k] - cpu0[k]) / (w1 - w0) for k in cpu0 if cpu0[k] is not None and cpu1.get(k) is not None}
            used["benchmark client"] = (me1 - me0) / (w1 - w0)
            used["other processes"] = max(0.0, (busy1 - busy0) / (w1 - w0) - sum(used.values()))
            client_gc.uninstall()
            processes[system] = {"ready_s": ready_s, "processes": launched.describe(), "cpu_utilisation": used,
                                 "num_devices": launched.num_devices, "sweep_wall_s": w1 - w0,
                                 "client_gc": client_gc.snapshot()}
        log(f"[{system}] goodput {sweeps[system].goodput:.3g} req/s ({sweeps[system].goodput / launched.num_devices:.3g} "
            f"per device); CPU cores used: " + json.dumps({k: round(v, 2) for k, v in used.items()}))

    restore_gc(gc_before)  # the caller's collector as it was (a library call, a test)
    summary = _summarize(cfg, sweeps, processes, sims, sim_goodput, requests, schedule, slos, slo_source,
                         cluster.profile_path, sorted({r for rs in rates.values() for r in rs}), started, regime=None)
    for f in summary["fidelity"]:
        run = sweeps[f["system"]].run_at(f["rate"])
        sim, offsets = sims[f["system"]], schedule(f["rate"])
        full = sim.result_all(requests, offsets)  # one replay serves both the split and the attainment
        jittered = sim.result_all(requests, jitter_offsets(offsets, cfg.seed))
        f.update(ttft_decomposition(run, full, slos, sim.measured_part(full, offsets).attainment, jittered))
        f.update(fidelity_extras(f, run, sim, requests, offsets, seed=cfg.seed, jitter=jitter_offsets, jittered=jittered,
                                 schedule=schedule))
    summary.update(emulation_summary(summary, cluster, plans, search_s))
    summary["emulation"].update(run_seconds=run_s, settle_s=settle_s, steady_state_runs=ec.steady)
    summary["steady_state"] = steady
    summary.update(steady_ratios(steady))
    log(f"largest gap to the simulator: {_pts(summary['max_attainment_gap_points'])}; with the engine's measured "
        f"host time and front-end hop charged: {_pts(summary['max_gap_with_host_points'])}; beyond the simulator's own 1-ms jitter "
        f"band: {_pts(summary['max_gap_beyond_jitter_points'])}; with the router's arrival times replayed: "
        f"{_pts(summary['max_arrival_replay_gap_points'])}; read as a rate: "
        f"{_pct(summary['max_rate_equivalent_gap_pct'])}")
    summary["wall_s"] = time.perf_counter() - t_start
    _write_outputs(cfg, out, sweeps, summary, slos, log)
    _plot_fidelity(summary, out / "fidelity.png")
    return summary


def _steady_state(ec: EmulatedCompare, sims, requests, schedule, sim_goodput, plans, mean_output: float,
                  tpot_s: float, *, runs: tuple[float, float]) -> dict[str, Any]:
    """The simulator's steady-state goodput of every placement (steadystate.py): the goodput on the
    runs' own traces (`runs`: their settle_s, run_seconds) when they are steady-state runs, else on a
    longer sample of the same workload."""
    cfg = ec.compare
    devices = {s: plans[s].num_devices for s in sims}
    starts = {s: sim_goodput[s] or plans[s].planner_goodput for s in sims}
    if ec.steady:
        return steady_summary(sim_goodput, devices, {}, settle_s=runs[0], run_s=runs[1])
    settle_s, run_s = steady_run_length(mean_output, tpot_s)
    sweep = SweepConfig(rates=(1.0,), arrival=cfg.arrival, cv=cfg.cv, seed=cfg.seed, duration_s=run_s, settle_s=settle_s,
                        min_requests=MIN_RUN_REQUESTS, warmup_requests=0)
    top = 1.5 * max(starts.values())
    long = load_bench_requests(cfg.workload, num_requests=sweep.requests_at(top, 1 << 30), seed=cfg.seed, scale=cfg.scale,
                               prompt_format=cfg.prompt_format, source_limit=cfg.source_limit)
    return steady_state_goodputs(sims, long, sized_schedule(sweep, len(long)), starts, devices,
                                 settle_s=settle_s, run_s=run_s)


def _plan_only_summary(ec: EmulatedCompare, out: Path, plans, sim_goodput, steady, rates, slos: SLOs,
                       slo_source: dict[str, Any], search_s: float, started: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """summary.json of a `--plan-only` compare: what the experiment would run and what the
    simulator expects of it (placements, the simulated goodput on the runs' traces and in steady
    state, the scan rates), with no server started and nothing measured."""
    cfg = ec.compare
    summary: dict[str, Any] = {
        "plan_only": True,
        "config": dataclasses.asdict(cfg) | {"out": str(cfg.out)},
        "slo": {"ttft_s": slos.ttft_s, "tpot_s": slos.tpot_s, "target": slos.target, **slo_source},
        "devices": ec.cluster.devices,
        "machine": started,
        "planner_search_s": search_s,
        "systems": {s: {"placement": plans[s].placement.to_dict(), "placement_text": describe_placement(plans[s].placement),
                        "num_devices": plans[s].num_devices, "planner_goodput": plans[s].planner_goodput,
                        "simulated_goodput": sim_goodput[s], "scan_rates": list(rates[s])} for s in plans},
        "steady_state": steady,
        "wall_s": wall_s,
    }
    summary.update(steady_ratios(steady))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def steady_ratios(steady: dict[str, Any]) -> dict[str, float]:
    """The steady-state ratios as top-level summary keys (steady_state_disaggregated_over_*_ratio)."""
    return {f"steady_state_{k}": v for k, v in steady.items() if k.endswith("_ratio")}


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} points"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}% of the rate"


def sized_schedule(sweep_cfg: SweepConfig, available: int) -> Callable[[float], list[float]]:
    """Send offsets of the run at a rate, as sweep_target makes them (sweep.requests_at of the sample)."""
    from dsjax.bench.loadgen import send_schedule

    return lambda rate: send_schedule(sweep_cfg.requests_at(rate, available), rate=rate, arrival=sweep_cfg.arrival,
                                      cv=sweep_cfg.cv, seed=sweep_cfg.seed)


def trace_simulator(cluster: EmulatedCluster, system: str, placement, slos: SLOs, settle_s: float, config=None):
    """The simulator of one system's runs on the emulated cluster (its profile, limits and memory;
    `config` replaces the cluster's SimConfig)."""
    from dsjax.bench.simcompare import TraceSimulator
    from dsjax.planner.latency import load_profile

    sim = TraceSimulator(system=system, profile=load_profile(cluster.profile_for(system)), model=cluster.model, slos=slos,
                         max_num_seqs=cluster.max_num_seqs, max_prefill_tokens=cluster.max_prefill_tokens,
                         placement=placement, config=config or cluster.sim_config(), memory=cluster.memory())
    sim.settle_s = settle_s
    return sim


def _search_lengths(cfg: CompareConfig) -> list[tuple[int, int]]:
    """The planner's workload: the same dataset, preparation, scale and seed as the sample sent."""
    from dsjax.workloads.loader import load_workload

    return [(p, o) for p, o in load_workload(cfg.workload, num_requests=5000, seed=cfg.seed, scale=cfg.scale,
                                              source_limit=cfg.source_limit)]


def jitter_offsets(offsets_s, seed: int, max_s: float = 1e-3) -> list[float]:
    """The send offsets, each moved by up to `max_s` either way (sorted, none before 0): the same
    trace as far as any SLO can tell, for the simulator's noise floor against itself."""
    import numpy as np

    rng = np.random.default_rng(seed + 7919)
    moved = np.asarray(offsets_s, dtype=np.float64) + rng.uniform(-max_s, max_s, len(offsets_s))
    return np.sort(np.maximum(moved, 0.0)).tolist()


def ttft_decomposition(run, sim, slos: SLOs, sim_attainment: float | None = None, jittered=None) -> dict[str, Any]:
    """Where a run's TTFTs part from the simulator's (`sim`: its SimResult of every request of the
    same trace, settling ones included; `sim_attainment`: the measured part's), per
    request, in ms (p50 / p90): the engine (the server's queue + prefill, from the router's submit
    to the first token) minus the simulator; the router (its first-token time minus the engine's);
    the client (its receive time minus the router's). And `engine_side_attainment`: the run's
    attainment with each TTFT taken at the engine and TPOT as the client saw it, i.e. what the
    scheduler delivered, beside the simulator's model of it (`engine_side_gap_points`).

    Request against request, a colocated replay is chaotic: a prompt arriving during a decode step
    waits out the rest of it (0 to a step, by phase), and one request finishing a millisecond
    earlier sends the next to another replica. So the paired percentiles have a noise floor that
    is not a bias: `jittered` (the simulator's SimResult of the same trace with every arrival moved
    by up to 1 ms) measures it as `ttft_sim_noise_ms` (simulator against itself, paired p50 / p90).
    The bias is in `ttft_engine_minus_sim_mean_ms` (paired mean) and `ttft_engine_vs_sim_quantiles_ms`
    (engine p50 / p90 minus the simulator's p50 / p90 over the same requests)."""
    import numpy as np

    from dsjax.bench.metrics import tpot_s, ttft_s

    parts: dict[str, list[float]] = {"engine_minus_sim": [], "router_minus_engine": [], "client_minus_router": []}
    ok, engine_ttfts, sim_ttfts, noise = [], [], [], []
    for r in run.measured:
        bd, client_ttft = r.breakdown, ttft_s(r.record)
        if bd is None or r.server_ttft_s is None or client_ttft is None:
            ok.append(False)
            continue
        engine = bd.queue_s + bd.prefill_s
        parts["engine_minus_sim"].append(engine - float(sim.ttft_s[r.index]))
        engine_ttfts.append(engine)
        sim_ttfts.append(float(sim.ttft_s[r.index]))
        if jittered is not None:
            noise.append(float(jittered.ttft_s[r.index]) - float(sim.ttft_s[r.index]))
        parts["router_minus_engine"].append(r.server_ttft_s - engine)
        parts["client_minus_router"].append(client_ttft - r.server_ttft_s)
        tpot = tpot_s(r.record)
        ok.append(engine <= slos.ttft_s and (tpot is None or tpot <= slos.tpot_s))
    out: dict[str, Any] = {f"ttft_{k}_ms": [round(1e3 * float(np.percentile(v, q)), 2) for q in (50, 90)] if v else None
                           for k, v in parts.items()}
    finite = [(e, m) for e, m in zip(engine_ttfts, sim_ttfts) if np.isfinite(m)]
    if finite:
        e, m = np.array(finite).T
        out["ttft_engine_minus_sim_mean_ms"] = round(1e3 * float(np.mean(e - m)), 2)
        out["ttft_engine_vs_sim_quantiles_ms"] = [round(1e3 * float(np.percentile(e, q) - np.percentile(m, q)), 2)
                                                  for q in (50, 90)]
    noise = [x for x in noise if np.isfinite(x)]
    if noise:
        out["ttft_sim_noise_ms"] = [round(1e3 * float(np.percentile(noise, q)), 2) for q in (50, 90)]
    out["engine_side_attainment"] = float(np.mean(ok)) if ok else None
    if ok:
        out["engine_side_gap_points"] = 100 * (out["engine_side_attainment"]
                                               - (sim.attainment if sim_attainment is None else sim_attainment))
    return out


def emulation_summary(summary: dict[str, Any], cluster: EmulatedCluster, plans: dict, search_s: float) -> dict[str, Any]:
    """The emulated run's own keys: the cluster, every system's placement, the simulator's
    attainment beside each measured one, and the gaps."""
    per_system: dict[str, Any] = {}
    for s, plan in plans.items():
        rows = [f for f in summary["fidelity"] if f["system"] == s]
        per_system[s] = {
            "placement": plan.placement.to_dict(), "placement_text": describe_placement(plan.placement),
            "num_devices": plan.num_devices, "planner": plan.details, "planner_goodput": plan.planner_goodput,
            "rates": [f["rate"] for f in rows],
            "real_attainment": [f["real"] for f in rows], "simulated_attainment": [f["simulated"] for f in rows],
            "max_attainment_gap_points": max((abs(f["diff_points"]) for f in rows), default=None),
            "engine_side_attainment": [f.get("engine_side_attainment") for f in rows],
            "max_engine_side_gap_points": max((abs(f["engine_side_gap_points"]) for f in rows
                                               if f.get("engine_side_gap_points") is not None), default=None),
            "decode_host_ms": [f.get("decode_host_ms") for f in rows],
            **extras_summary(rows),
        }
        summary["systems"][s].update(placement=plan.placement.to_dict(),
                                     max_attainment_gap_points=per_system[s]["max_attainment_gap_points"])
    gaps = [v["max_attainment_gap_points"] for v in per_system.values() if v["max_attainment_gap_points"] is not None]
    engine_gaps = [v["max_engine_side_gap_points"] for v in per_system.values() if v["max_engine_side_gap_points"] is not None]
    return {
        "emulation": {"cluster": cluster.describe(), "search_s": search_s, "systems": per_system,
                      "fidelity_rates_per_system": {s: len(v["rates"]) for s, v in per_system.items()},
                      "enough_fidelity_rates": all(len(v["rates"]) >= MIN_FIDELITY_RATES for v in per_system.values())},
        "max_attainment_gap_points": max(gaps) if gaps else None,
        "max_engine_side_gap_points": max(engine_gaps) if engine_gaps else None,
        **extras_summary(summary["fidelity"]),
        "devices": cluster.devices,
    }


def _plot_fidelity(summary: dict[str, Any], path: Path) -> None:
    from dsjax.bench.plots import plot_measured_vs_simulated

    plot_measured_vs_simulated(summary["fidelity"], path, target=summary["slo"]["target"],
                               title=f"{summary['config']['model']} {summary['config']['workload']}, "
                                     f"{summary['devices']} emulated devices: measured (solid) vs simulated (dashed)")
