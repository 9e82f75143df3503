"""The headline experiment: per-device goodput of disaggregated vs colocated vs chunked prefill.

    python -m dsjax.bench compare [--quick] [--workload sharegpt] [--model opt-125m] [--out DIR]

The default model is opt-125m in float32: 500 MB of weights, 16x this machine's 32 MB last-level
cache, so a decode step streams every weight from memory (bound by bandwidth, as every LLM decode
on a GPU is), the regime disaggregation exists for. `--model small-llama` (14 MB, cache-resident,
compute-bound decode) is the second regime (docs/results.md compares the two).

1. Profile: `python -m dsjax.plan profile --quick` pinned to one core (or a cached profile).
2. SLOs (stated rule): TTFT = 3.5 x the isolated 512-token prefill, TPOT = 5 x the isolated decode
   step at batch 1 with 512 tokens of context, both from the profile's metadata.
3. One seeded sample of the real workload, sent identically to every system.
4. Each system in turn on the same two cores (servers.py): rate scan + bisection for goodput.
5. The planner's simulator replays the same trace on the measured profile (simcompare.py).
6. results.json / results.csv (one row per run), summary.json (goodputs, ratios, SLOs, fidelity
   table, machine state), plots, and a markdown summary (summary.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dsjax.bench.analysis import SLOs, write_json
from dsjax.bench.loadgen import send_schedule
from dsjax.bench.metrics import write_results_csv, write_results_json
from dsjax.bench.prompts import load_bench_requests
from dsjax.bench.regime import derive_slos, regime_numbers
from dsjax.bench.report import render, summary_markdown
from dsjax.bench.servers import SYSTEMS, LaunchedSystem, ServerOptions, launch_system
from dsjax.bench.sweep import SweepConfig, SweepResult, sweep_target

DEFAULT_CACHE = Path(os.environ.get("DSJAX_CACHE", os.path.expanduser("~/.cache/dsjax")))
# The scan spans 0.3x the lowest to 1.5x the highest simulated goodput: on this machine the
# simulator (runner-only profile) has been optimistic, so the scan reaches well below it.
AUTO_RATE_FACTORS = (0.3, 0.5, 0.75, 1.0, 1.5)
QUICK_RATE_FACTORS = (0.5, 1.0, 1.5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareConfig:
    out: Path
    model: str = "opt-125m"
    workload: str = "sharegpt"
    scale: float = 8.0  # opt-125m: ShareGPT / 8 keeps a full run near 40 minutes (small-llama: 4)
    num_requests: int = 120
    seed: int = 0
    prompt_format: str = "bytes"
    source_limit: int | None = None  # read only the first N dataset records (tests)
    systems: tuple[str, ...] = SYSTEMS
    rates: tuple[float, ...] | None = None  # None: from the simulator's goodputs (times rates_factors)
    rates_factors: tuple[float, ...] = AUTO_RATE_FACTORS
    arrival: str = "poisson"
    cv: float = 1.0
    target: float = 0.9
    ttft_s: float | None = None  # override the derived SLOs
    tpot_s: float | None = None
    profile: Path | None = None  # use this profile (else cached / measured)
    reprofile: bool = False
    quick_profile: bool = True
    max_bisections: int = 4
    rel_tol: float = 0.05
    # Sent to each system before measuring, at once, then at the highest and the lowest scan rate
    # (the server compiles its shapes; not measured). None: the whole sample.
    warmup_requests: int | None = 16
    # Seconds of unmeasured traffic at each rate just before its measured run, for the simulator's
    # "probe" speed calibration (sweep.SweepConfig.probe_s). 0: none.
    speed_probe_s: float = 0.0
    server: ServerOptions = ServerOptions()
    progress: bool = True

    def __post_init__(self) -> None:
        known = SYSTEMS + ("vllm",)  # vllm: the emulated compare's baseline (colocated, --baseline-profile)
        bad = [s for s in self.systems if s not in known]
        if bad or not self.systems:
            raise ValueError(f"systems={self.systems} must be a non-empty subset of {known}")


def quick_config(**overrides: Any) -> CompareConfig:
    """The --quick setting: at most ~12 minutes on a 2-core machine with opt-125m (fewer and
    shorter requests, three scan rates, one bisection, a short warm-up)."""
    base = dict(num_requests=40, scale=8.0, max_bisections=1, rel_tol=0.15, rates_factors=QUICK_RATE_FACTORS,
                warmup_requests=8)
    base.update(overrides)
    return CompareConfig(**base)


# ---- 1-2. profile and SLOs --------------------------------------------------------------------


def profile_command(model: str, out: Path, *, dtype: str, quick: bool, core: int | None,
                    xla_flags: str) -> tuple[list[str], dict]:
    """`python -m dsjax.plan profile` for one core (taskset) and its environment."""
    cmd = [sys.executable, "-m", "dsjax.plan", "profile", "--model", model, "--dtype", dtype, "--out", str(out),
           "--no-progress"]
    if quick:
        cmd.append("--quick")
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    return cmd, env


def step_code_digest() -> str:
    """12 hex digits of the code that prices a step (models/, pallas_kernels/, dsjax/runtime/): a
    cached profile is reused only by the code that measured it."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for f in sorted(p for d in ("models", "pallas_kernels", "dsjax/runtime") for p in (root / d).rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def obtain_profile(cfg: CompareConfig, log: Callable[[str], None]) -> Path:
    """cfg.profile if given; else the cached profile for (model, dtype, grid), measured if absent."""
    if cfg.profile is not None:
        if not Path(cfg.profile).is_file():
            raise ValueError(f"profile {cfg.profile} does not exist")
        return Path(cfg.profile)
    grid = "quick" if cfg.quick_profile else "full"
    path = DEFAULT_CACHE / "bench" / f"profile-{cfg.model}-{cfg.server.dtype}-{grid}-1core-{step_code_digest()}.json"
    if path.is_file() and not cfg.reprofile:
        log(f"profile: reusing {path}")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    core = cfg.server.cores[0] if cfg.server.pin else None
    cmd, env = profile_command(cfg.model, path, dtype=cfg.server.dtype, quick=cfg.quick_profile, core=core,
                               xla_flags=cfg.server.xla_flags)
    log(f"profile: {' '.join(cmd)}")
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=str(Path(__file__).resolve().parents[2]))
    log(f"profile: written to {path} in {time.perf_counter() - t0:.0f} s")
    return path


# ---- the experiment ---------------------------------------------------------------------------


def _machine_state() -> dict[str, Any]:
    load = os.getloadavg()
    return {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "loadavg_1_5_15": load,
            "cpus": os.cpu_count()}


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat; 0 elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _schedule(cfg: CompareConfig, n: int) -> Callable[[float], list[float]]:
    return lambda rate: send_schedule(n, rate=rate, arrival=cfg.arrival, cv=cfg.cv, seed=cfg.seed)


def auto_rates(sim_goodputs: dict[str, float], factors: Sequence[float] = AUTO_RATE_FACTORS) -> tuple[float, ...]:
    """Scan rates around the simulated goodputs: from factors[0] x the lowest to factors[-1] x the
    highest, geometrically spaced, 2 significant digits."""
    positive = [g for g in sim_goodputs.values() if g > 0]
    if not positive:
        raise ValueError(f"the simulator finds no positive goodput ({sim_goodputs}); pass --rates")
    lo, hi = factors[0] * min(positive), factors[-1] * max(positive)
    k = max(len(factors), 2)
    rates = sorted({float(f"{lo * (hi / lo) ** (i / (k - 1)):.2g}") for i in range(k)})
    return tuple(rates)


def run_compare(cfg: CompareConfig, *, log: Callable[[str], None] = print,
                launcher: Callable[[str, ServerOptions, Path], LaunchedSystem] = launch_system) -> dict[str, Any]:
    """Runs the whole experiment; returns (and writes to cfg.out/summary.json) the summary."""
    from dsjax.bench.simcompare import TraceSimulator  # planner imports, kept off the client path

    if "vllm" in cfg.systems:
        raise ValueError("system 'vllm' (colocated priced by another profile) needs --emulate and --baseline-profile")
    from dsjax.planner.latency import load_profile

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    started = _machine_state()
    log(f"machine: load average {started['loadavg_1_5_15']} on {started['cpus']} CPUs at {started['time']}")
    profile_path = obtain_profile(cfg, log)
    profile = load_profile(profile_path)
    slos, slo_source = derive_slos(dict(profile.metadata), cfg.target)
    if cfg.ttft_s is not None or cfg.tpot_s is not None:
        slos = SLOs(ttft_s=cfg.ttft_s or slos.ttft_s, tpot_s=cfg.tpot_s or slos.tpot_s, target=cfg.target)
        slo_source["overridden"] = True
    log(f"SLOs: TTFT {slos.ttft_s * 1e3:.1f} ms, TPOT {slos.tpot_s * 1e3:.2f} ms ({slo_source['rule']}; "
        f"prefill_512 {slo_source['prefill_512_ms']:.2f} ms, decode_bs1_ctx512 {slo_source['decode_bs1_ctx512_ms']:.3f} ms)")

    requests = load_bench_requests(cfg.workload, num_requests=cfg.num_requests, seed=cfg.seed, scale=cfg.scale,
                                   prompt_format=cfg.prompt_format, source_limit=cfg.source_limit)
    schedule = _schedule(cfg, len(requests))
    if cfg.server.max_model_len is None:
        # Every system serves the sample's longest request and nothing longer: the KV pool and the
        # shapes each server compiles at start-up (--warmup-shapes) follow the workload, not the
        # model's 2048-token context (opt-125m: minutes of compilation per server otherwise).
        longest = max(r.prompt_len + r.output_len for r in requests)
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, max_model_len=1 << (longest - 1).bit_length()))
        log(f"servers: --max-model-len {cfg.server.max_model_len} (the sample's longest request: {longest} tokens)")
    sims = {s: TraceSimulator(system=s, profile=profile, model=cfg.model, slos=slos, max_num_seqs=cfg.server.max_num_seqs,
                              max_prefill_tokens=cfg.server.max_prefill_tokens) for s in cfg.systems}
    probe_rates = tuple(float(f"{0.25 * 2 ** (i / 2):.3g}") for i in range(24))  # 0.25 .. 724 req/s
    sim_goodput = {s: sims[s].goodput(requests, schedule, probe_rates) for s in cfg.systems}
    rates = cfg.rates or auto_rates(sim_goodput, cfg.rates_factors)
    log(f"simulated goodput (req/s, {len(cfg.server.cores)} devices): "
        + ", ".join(f"{s} {g:.3g}" for s, g in sim_goodput.items()) + f"; scan rates {list(rates)}")

    sweep_cfg = SweepConfig(rates=rates, arrival=cfg.arrival, cv=cfg.cv, seed=cfg.seed, rel_tol=cfg.rel_tol,
                            max_bisections=cfg.max_bisections,
                            warmup_requests=len(requests) if cfg.warmup_requests is None else cfg.warmup_requests,
                            warmup_rates=(None, max(rates), min(rates)), probe_s=cfg.speed_probe_s)
    sweeps: dict[str, SweepResult] = {}
    processes: dict[str, Any] = {}
    served: dict[str, Any] = {}  # system -> ServedCalibration (the simulator fitted on its warm-up)
    step_dirs: dict[str, Path] = {}  # system -> its servers' step logs
    for system in cfg.systems:
        t0 = time.perf_counter()
        log(f"[{system}] starting servers ({cfg.model}, cores {list(cfg.server.cores)})")
        with launcher(system, cfg.server, out / "logs") as launched:
            ready_s = time.perf_counter() - t0
            cpu0, w0, me0, busy0 = launched.cpu_seconds(), time.perf_counter(), _own_cpu_s(), _machine_busy_s()
            desc = launched.describe()
            log(f"[{system}] ready in {ready_s:.0f} s: " + "; ".join(
                f"{d['name']} pid {d['pid']} affinity {d['affinity']} threads {d['threads']}" for d in desc))
            sweeps[system] = sweep_target(launched.targets if len(launched.targets) > 1 else launched.targets[0], requests,
                                          sweep_cfg, slos, label=system, labels={"devices": launched.num_devices},
                                          out_dir=out, progress=cfg.progress, log=log)
            cpu1, w1, me1, busy1 = launched.cpu_seconds(), time.perf_counter(), _own_cpu_s(), _machine_busy_s()
            used = {k: (cpu1[k] - cpu0[k]) / (w1 - w0) for k in cpu0 if cpu0[k] is not None and cpu1.get(k) is not None}
            used["benchmark client"] = (me1 - me0) / (w1 - w0)
            # Everything else that ran on the machine meanwhile (other users' jobs): the noise.
            used["other processes"] = max(0.0, (busy1 - busy0) / (w1 - w0) - sum(used.values()))
            processes[system] = {"ready_s": ready_s, "processes": desc, "cpu_utilisation": used,
                                 "num_devices": launched.num_devices}
        cal = _calibrate(system, launched, sweeps[system], profile, cfg, log)
        if cal is not None:
            served[system] = cal
            step_dirs[system] = Path(launched.step_log_dir)
        log(f"[{system}] goodput {sweeps[system].goodput:.3g} req/s"
            + (" (every scanned rate passed)" if sweeps[system].saturated else "")
            + "; CPU cores used per process: "
            + json.dumps({k: round(v, 2) for k, v in processes[system]["cpu_utilisation"].items()}))

    served_sims = {s: TraceSimulator.calibrated(c, system=s, model=cfg.model, slos=slos, max_num_seqs=cfg.server.max_num_seqs,
                                                max_prefill_tokens=cfg.server.max_prefill_tokens)
                   for s, c in served.items()}
    summary = _summarize(cfg, sweeps, processes, sims, sim_goodput, requests, schedule, slos, slo_source, profile_path,
                         rates, started, served_sims=served_sims, served_info={s: c.info for s, c in served.items()},
                         probe_rates=probe_rates, rescaled=_rescaled_sims(served, step_dirs, sweeps, cfg, slos),
                         regime=regime_numbers(profile, cfg.model))
    summary["wall_s"] = time.perf_counter() - t_start
    _write_outputs(cfg, out, sweeps, summary, slos, log)
    return summary


def _calibrate(system: str, launched, sweep: SweepResult, profile, cfg: CompareConfig, log):
    """The simulator's served calibration from this system's warm-up (None without step logs)."""
    from dsjax.bench.simcompare import served_calibration

    step_dir = getattr(launched, "step_log_dir", None)
    if step_dir is None or sweep.warmup_window is None:
        return None
    try:
        cal = served_calibration(step_log_dir=step_dir, window=sweep.warmup_window, base=profile, model=cfg.model,
                                 warmup_runs=sweep.warmup_runs if system == "disaggregated" else (),
                                 disaggregated=system == "disaggregated")
    except ValueError as e:
        log(f"[{system}] no served calibration: {e}")
        return None
    i = cal.info
    log(f"[{system}] served profile from {i['steps_in_window']} warm-up steps ({i['prefill_shapes']} prefill / "
        f"{i['decode_shapes']} decode shapes, median fit error {i['prefill_median_rel_err']:.0%} / "
        f"{i['decode_median_rel_err']:.0%}); KV transfer {cal.transfer_fixed_s * 1e3:.1f} ms"
        + (f" + bytes at {cal.link_bytes_per_s / 1e6:.0f} MB/s" if cal.link_bytes_per_s else "")
        + (f"; KV landing {cal.decode_join_s * 1e3:.1f} ms a request" if cal.decode_join_s else ""))
    return cal


# The "recent speed" calibration looks back this long before a run (at whatever the servers were
# doing: the warm-up or the previous runs).
RECENT_WINDOW_S = 30.0


def speed_windows(started_at: float, wall_s: float, probe: tuple[float, float] | None = None) -> dict[str, tuple[float, float]]:
    """Variant -> wall-clock window of step records the served calibration is rescaled over for
    the measured run that started at `started_at` (see `_rescaled_sims`)."""
    windows = {"recent": (started_at - RECENT_WINDOW_S, started_at), "same_run": (started_at, started_at + wall_s)}
    if probe is not None:
        windows["probe"] = probe
    return windows


def _rescaled_sims(served, step_dirs, sweeps, cfg: CompareConfig, slos: SLOs) -> dict[tuple[str, str, float], tuple[Any, dict]]:
    """(variant, system, rate) -> (simulator, speed factors) for every measured run, the served
    calibration rescaled to the machine's speed (simcompare.speed_scaled) over a window:

    - "recent": the RECENT_WINDOW_S of step records before the run started. A prediction: what an
      online planner knows when the run begins (the run itself is not used).
    - "probe": the unmeasured probe at the same rate just before the run (only with
      `speed_probe_s`). A prediction too, at the run's load.
    - "same_run": the run's own step records. A diagnostic, not a prediction: it uses the run's
      step times (never its attainment) to separate the simulator's queueing model from the drift
      of step costs on this machine.
    """
    from dsjax.bench.simcompare import TraceSimulator, speed_scaled, step_records

    out = {}
    for system, cal in served.items():
        records = step_records(step_dirs[system])
        for run in sweeps[system].runs:
            if run.stopped_early or not run.started_at == run.started_at:  # nan: no wall clock
                continue
            windows = speed_windows(run.started_at, run.wall_s, sweeps[system].probe_windows.get(run.rate))
            for variant, window in windows.items():
                scaled, factors = speed_scaled(cal, records=records, model=cfg.model, window=window)
                sim = TraceSimulator.calibrated(scaled, system=system, model=cfg.model, slos=slos,
                                                max_num_seqs=cfg.server.max_num_seqs,
                                                max_prefill_tokens=cfg.server.max_prefill_tokens)
                out[(variant, system, run.rate)] = (sim, dataclasses.asdict(factors))
    return out


def _sim_columns(prefix: str, row: dict, sim, *, p90: bool = False) -> dict[str, float]:
    """One simulator's columns of a fidelity entry (`sim`: a SimulatedRun of the row's rate)."""
    cols = {f"{prefix}simulated": sim.attainment, f"{prefix}diff_points": 100 * (row["attainment_joint"] - sim.attainment),
            f"{prefix}sim_ttft": sim.ttft_attainment, f"{prefix}sim_tpot": sim.tpot_attainment}
    if p90:
        cols.update({f"{prefix}sim_ttft_p90_s": sim.ttft_p90_s, f"{prefix}sim_tpot_p90_s": sim.tpot_p90_s})
    return cols


def _summarize(cfg, sweeps, processes, sims, sim_goodput, requests, schedule, slos, slo_source, profile_path, rates, started,
               *, served_sims=None, served_info=None, probe_rates=(), rescaled=None, regime=None):
    served_sims, served_info, rescaled = served_sims or {}, served_info or {}, rescaled or {}
    systems: dict[str, Any] = {}
    fidelity = []
    for system, sweep in sweeps.items():
        devices = processes[system]["num_devices"]
        systems[system] = {
            "goodput": sweep.goodput, "per_device_goodput": sweep.goodput / devices, "num_devices": devices,
            "saturated": sweep.saturated, "probes": sweep.probes, "warmup_window": sweep.warmup_window,
            "speed_probe_windows": [[rate, *w] for rate, w in sorted(sweep.probe_windows.items())],
            "simulated_goodput": sim_goodput[system], "simulated_per_device_goodput": sim_goodput[system] / devices,
            **processes[system],
        }
        served_sim = served_sims.get(system)
        if served_sim is not None:
            g = served_sim.goodput(requests, schedule, probe_rates)
            systems[system].update(served_calibration=served_info.get(system), served_simulated_goodput=g,
                                   served_simulated_per_device_goodput=g / devices)
        for row in sweep.full_rows():
            offsets = schedule(row["rate"])
            entry = {"system": system, "rate": row["rate"], "real": row["attainment_joint"],
                     "real_ttft": row["attainment_ttft"], "real_tpot": row["attainment_tpot"],
                     "real_ttft_p90_s": row["ttft_p90_s"], "real_tpot_p90_s": row["tpot_p90_s"],
                     **_sim_columns("", row, sims[system].run(requests, offsets), p90=True)}
            if served_sim is not None:
                entry.update(_sim_columns("served_", row, served_sim.run(requests, offsets), p90=True))
            for variant in ("recent", "probe", "same_run"):
                if (variant, system, row["rate"]) in rescaled:
                    v_sim, factors = rescaled[(variant, system, row["rate"])]
                    entry.update(_sim_columns(f"{variant}_", row, v_sim.run(requests, offsets)))
                    entry[f"{variant}_speed_factors"] = factors
            fidelity.append(entry)
    ratios = {}
    if "disaggregated" in systems:
        d = systems["disaggregated"]["per_device_goodput"]
        for base in ("colocated", "chunked", "vllm"):
            if base in systems:
                b = systems[base]["per_device_goodput"]
                ratios[f"disaggregated_over_{base}"] = d / b if b > 0 else float("inf")
    for base in ("colocated", "chunked", "vllm"):
        if "disaggregated" in systems and base in systems:
            sd, sb = systems["disaggregated"]["simulated_per_device_goodput"], systems[base]["simulated_per_device_goodput"]
            ratios[f"simulated_disaggregated_over_{base}"] = sd / sb if sb > 0 else float("inf")
    ref_rate = _reference_rate(sweeps, rates)
    scales = {s: sw.rows[[r["rate"] for r in sw.rows].index(ref_rate)]["tightest_slo_scale"]
              for s, sw in sweeps.items() if ref_rate in [r["rate"] for r in sw.rows]}
    lens = [(r.prompt_len, r.output_len) for r in requests]
    return {
        "config": {"model": cfg.model, "workload": cfg.workload, "scale": cfg.scale, "num_requests": len(requests),
                   "seed": cfg.seed, "prompt_format": cfg.prompt_format, "arrival": cfg.arrival, "cv": cfg.cv,
                   "rates": list(rates), "target": cfg.target, "max_bisections": cfg.max_bisections, "rel_tol": cfg.rel_tol,
                   "warmup_requests": cfg.warmup_requests, "source_limit": cfg.source_limit,
                   "server": dataclasses.asdict(cfg.server)},
        "workload_stats": {"prompt_mean": sum(p for p, _ in lens) / len(lens),
                           "output_mean": sum(o for _, o in lens) / len(lens),
                           "prompt_max": max(p for p, _ in lens), "output_max": max(o for _, o in lens)},
        "slo": {"ttft_s": slos.ttft_s, "tpot_s": slos.tpot_s, "target": slos.target, **slo_source},
        "profile": str(profile_path),
        "per_device_goodput": {s: d["per_device_goodput"] for s, d in systems.items()},
        **{f"{k}_ratio": v for k, v in ratios.items()},
        "regime": regime,
        "systems": systems,
        "ratios": ratios,
        "reference_rate": ref_rate,
        "tightest_slo_scale_at_reference_rate": scales,
        "fidelity": fidelity,
        "fidelity_max_abs_diff_points": max((abs(f["diff_points"]) for f in fidelity), default=None),
        "served_fidelity_max_abs_diff_points": max((abs(f["served_diff_points"]) for f in fidelity
                                                    if "served_diff_points" in f), default=None),
        "fidelity_rows_within_3_points": {
            variant: sum(abs(f[f"{variant}diff_points"]) <= 3.0 for f in fidelity if f"{variant}diff_points" in f)
            for variant in ("", "served_", "recent_", "probe_", "same_run_")
            if any(f"{variant}diff_points" in f for f in fidelity)},
        "fidelity_rows": len(fidelity),
        "machine": {"start": started, "end": _machine_state()},
    }


def _reference_rate(sweeps: dict[str, SweepResult], rates: Sequence[float]) -> float:
    """The scan rate for the SLO-scale and breakdown plots: the highest rate every system ran in
    full at which disaggregated still holds the target (else the lowest scan rate)."""
    common = [r for r in rates if all(any(row["rate"] == r for row in sw.full_rows()) for sw in sweeps.values())]
    if not common:
        return rates[0]
    lead = sweeps.get("disaggregated") or next(iter(sweeps.values()))
    passing = [r for r in common if r <= lead.goodput]
    return max(passing) if passing else min(common)


def _write_outputs(cfg: CompareConfig, out: Path, sweeps: dict[str, SweepResult], summary: dict, slos: SLOs, log) -> None:
    rows = [row for sw in sweeps.values() for row in sw.rows]
    write_results_json(out / "results.json", rows)
    write_results_csv(out / "results.csv", rows)
    write_json(out / "summary.json", summary)
    render(out, sweeps, summary)
    log(summary_markdown(summary))
