"""Router capacity on emulated devices (issue #17 part 4): `python -m dsjax.bench capacity`.

    python -m dsjax.bench capacity --emulate PROFILE --model opt-13b --devices 32 [--quick] [--out DIR]

How fast can the control plane itself go? The devices are made plentiful, so that only the host's
CPU can break the SLOs:

1. One `python -m dsjax.serve --emulate PROFILE --workers processes` server: the router and one
   worker process per instance, by default prefill TP1 x N/2 + decode TP1 x N/2 (every device a
   worker of its own: the most processes, the most gRPC hops). `--workers inprocess` serves the
   same placement from one process (router + engine threads). `--device-speedup K` divides every
   profile time by K.
2. Requests of fixed, short lengths (`--prompt-len`, `--output-len`), sent at a ramp of rates
   (x`--rate-step` from `--start-rate`, or `--rates`), each for `--duration` seconds, until the
   joint SLO attainment drops below the target; then `--bisections` probes between the last
   passing and the first failing rate. No stream interval (every token is a message) unless
   `--stream-interval-ms` (with worker processes the decode workers hold the tokens).
3. Each rate: attainment, throughput, the simulator's attainment on the same trace (the devices
   alone), the added latency (dsjax/bench/capacity_stats.py: client TTFT / TPOT minus the
   simulator's, p50 / p90 / p99, TTFT split engine / router / client), the CPU cores used by
   every process (router, each worker, the client, the rest of the machine; in process the
   "router" is the whole server) and CPU microseconds per output token.
4. The capacity: the highest rate whose attainment reached the target. At that rate, one more run
   of `--profile-seconds` with py-spy sampling the router (where its time goes), the CPU of each
   of its threads, its user / system split and its context switches.
5. out/: summary.json (config, machine, rows, capacity, profile), summary.md, capacity.png,
   requests-<rate>.jsonl, logs/ (the server's log and plan).

The machine's other jobs share its cores: every row has the CPU the rest of the machine used
("other processes"), and the run starts by reporting the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsjax.bench.analysis import SLOs, run_row, write_json, write_requests_jsonl
from dsjax.bench.capacity_stats import (CPUSampler, cpu_per_token_us, cpu_use, diagnose, fmt_pcts, markdown, overhead,
                                        plot_capacity, proc_counters, start_pyspy, summarize_pyspy, thread_cpu)
from dsjax.bench.records import BenchRequest

WORKERS = ("processes", "inprocess")
QUICK = dict(start_rate=8.0, rate_step=2.0, duration_s=15.0, bisections=1, profile_s=10.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapacityConfig:
    profile: Path
    model: str = "opt-13b"
    devices: int = 32
    workers: str = "processes"
    prefill_replicas: int | None = None  # TP1 prefill instances (default devices // 2); decode gets the rest
    prompt_len: int = 128
    output_len: int = 64
    ttft_s: float = 0.25  # DistServe's OPT-13B ShareGPT SLOs
    tpot_s: float = 0.1
    target: float = 0.9
    rates: tuple[float, ...] | None = None  # None: the ramp
    start_rate: float = 8.0
    rate_step: float = 2 ** 0.5
    max_rate: float = 5000.0
    duration_s: float = 30.0  # seconds of arrivals per rate
    min_requests: int = 20
    bisections: int = 2
    profile_s: float = 20.0  # py-spy at the capacity (0: none)
    device_speedup: float = 1.0
    stream_interval_ms: float = 0.0
    max_num_seqs: int = 256
    max_prefill_tokens: int = 1024
    seed: int = 0
    out: Path = Path("bench-results/capacity")
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers not in WORKERS:
            raise ValueError(f"workers={self.workers!r} must be one of {WORKERS}")
        if self.devices < 2 or not 1 <= self.num_prefill < self.devices:
            raise ValueError(f"{self.devices} devices, {self.num_prefill} prefill: both phases need >= 1 device")
        if self.rate_step <= 1 or self.start_rate <= 0 or self.device_speedup <= 0 or self.duration_s <= 0:
            raise ValueError("--rate-step must be > 1; --start-rate, --device-speedup and --duration > 0")

    @property
    def num_prefill(self) -> int:
        return self.prefill_replicas or self.devices // 2


def placement(cfg: CapacityConfig):
    from dsjax.engine.placement import PhaseParallel, Placement

    return Placement(prefill=PhaseParallel(tp=1, replicas=cfg.num_prefill),
                     decode=PhaseParallel(tp=1, replicas=cfg.devices - cfg.num_prefill), mode="disaggregated")


def scaled_profile(src: Path, speedup: float, dst: Path) -> Path:
    """`src` with every latency coefficient divided by `speedup` (src itself when 1)."""
    if speedup == 1:
        return Path(src)
    doc = json.loads(Path(src).read_text())
    for model, by_tp in doc.items():
        if model != "metadata":
            for coeffs in by_tp.values():
                for k, v in coeffs.items():
                    if isinstance(v, list):
                        coeffs[k] = [x / speedup for x in v]
    dst.write_text(json.dumps(doc, indent=1))
    return dst


def make_requests(n: int, cfg: CapacityConfig, vocab: int) -> list[BenchRequest]:
    rng = np.random.default_rng(cfg.seed)
    ids = rng.integers(100, vocab - 100, size=(n, cfg.prompt_len))
    return [BenchRequest(index=i, prompt_len=cfg.prompt_len, output_len=cfg.output_len,
                         prompt_token_ids=tuple(int(x) for x in ids[i])) for i in range(n)]


def wait_workers(target: str, token: str, expected: int, timeout_s: float) -> float:
    """Seconds until the router lists `expected` live instances (every worker registered)."""
    import grpc

    from dsjax.bench.servers import admin_instances

    t0, seen = time.monotonic(), 0
    while time.monotonic() - t0 < timeout_s:
        try:
            seen = sum(i.alive for i in admin_instances(target, token, timeout_s=5))
            if seen >= expected:
                return time.monotonic() - t0
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{seen} of {expected} instances registered after {timeout_s:.0f} s")


class _Bench:
    """One server and what a run at one rate measures on it."""

    def __init__(self, cfg: CapacityConfig, launched, sim, slos: SLOs, vocab: int, log: Callable[[str], None]):
        self.cfg, self.launched, self.sim, self.slos, self.log = cfg, launched, sim, slos, log
        self.target = launched.targets[0]
        self.root = launched.processes[0].proc.pid
        self.sampler = CPUSampler(self.root)
        self.vocab = vocab
        self._requests: list[BenchRequest] = []

    def requests(self, n: int) -> list[BenchRequest]:
        if len(self._requests) < n:
            self._requests = make_requests(n, self.cfg, self.vocab)
        return self._requests[:n]

    def load(self, rate: float, seconds: float, tag: str):
        from dsjax.bench.loadgen import run_load, send_schedule

        n = max(self.cfg.min_requests, math.ceil(rate * seconds))
        reqs = self.requests(n)
        offsets = send_schedule(n, rate=rate, seed=self.cfg.seed)
        return reqs, offsets, run_load(self.target, reqs, offsets, rate=rate, progress=self.cfg.progress, tag=tag)

    def measure(self, rate: float, *, seconds: float | None = None, tag: str = "capacity") -> dict[str, Any]:
        a = self.sampler.sample()
        reqs, offsets, run = self.load(rate, seconds or self.cfg.duration_s, f"{tag}-{rate:.4g}")
        cpu = cpu_use(a, self.sampler.sample())
        row = run_row(run, self.slos)
        row["cpu"] = cpu
        row["output_tokens"] = sum(r.record.num_tokens for r in run.results)
        row["cpu_us_per_token"] = cpu_per_token_us(cpu, row["output_tokens"])
        row["overhead"] = overhead(run, self.sim.result(reqs, offsets), self.slos)
        row["send_lag_p99_ms"] = round(1e3 * run.send_lag_p99_s, 2)
        write_requests_jsonl(Path(self.cfg.out) / f"requests-{tag}-{rate:.4g}.jsonl", run)
        o, g = row["overhead"], cpu["groups"]
        self.log(f"{rate:.4g} req/s: attainment {row['attainment_joint']:.1%} (devices alone {o['sim_attainment']:.1%}), "
                 f"{row['output_token_rate']:.0f} tok/s; added TTFT p50/p99 {fmt_pcts(o['ttft_overhead_ms'])} ms, "
                 f"TPOT {fmt_pcts(o['tpot_overhead_ms'])} ms; CPU cores: router {g.get('router', 0):.2f}, workers "
                 f"{g.get('prefill workers', 0) + g.get('decode workers', 0):.2f}, client {g['client']:.2f}, "
                 f"other {g['other processes']:.2f} (machine {cpu['machine_busy']:.2f} of {cpu['cpus']})")
        return row

    def ramp(self) -> list[dict[str, Any]]:
        cfg, rows = self.cfg, []
        rates = list(cfg.rates) if cfg.rates else []
        rate = cfg.start_rate
        while True:
            if cfg.rates:
                if not rates:
                    break
                rate = rates.pop(0)
            elif rate > cfg.max_rate:
                break
            rows.append(self.measure(rate))
            if rows[-1]["attainment_joint"] < cfg.target:
                break
            rate = float(f"{rate * cfg.rate_step:.3g}")
        passing = [r["rate"] for r in rows if r["attainment_joint"] >= cfg.target]
        failing = [r["rate"] for r in rows if r["attainment_joint"] < cfg.target]
        lo, hi = (max(passing) if passing else None), (min(failing) if failing else None)
        for _ in range(cfg.bisections if lo and hi else 0):
            mid = float(f"{math.sqrt(lo * hi):.3g}")
            if not lo < mid < hi:
                break
            rows.append(self.measure(mid))
            lo, hi = (mid, hi) if rows[-1]["attainment_joint"] >= cfg.target else (lo, mid)
        return sorted(rows, key=lambda r: r["rate"])

    def profile(self, rate: float) -> dict[str, Any]:
        """One more run at `rate` with py-spy on the router, and its threads' CPU."""
        out, seconds = Path(self.cfg.out) / "router-pyspy.txt", max(1, round(self.cfg.profile_s))
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        children0 = r0.ru_utime + r0.ru_stime
        spy = start_pyspy(self.root, seconds, out)
        t0, threads0, counters0 = time.perf_counter(), thread_cpu(self.root), proc_counters(self.root)
        row = self.measure(rate, seconds=self.cfg.profile_s, tag="profile")
        wall = time.perf_counter() - t0
        threads1, counters1 = thread_cpu(self.root), proc_counters(self.root)
        threads = {k: round((v - threads0.get(k, 0.0)) / wall, 4) for k, v in threads1.items()}
        n_tokens = row["output_tokens"]
        per_s = {k: (counters1[k] - counters0[k]) / wall for k in counters0}
        result: dict[str, Any] = {
            "rate": rate, "row": row, "thread_cores": dict(sorted(threads.items(), key=lambda kv: -kv[1])),
            "router_user_cores": round(per_s["user_s"], 3), "router_system_cores": round(per_s["system_s"], 3),
            "router_context_switches_per_s": round(per_s["context_switches"]),
            "router_context_switches_per_token": None if not n_tokens else
            round((counters1["context_switches"] - counters0["context_switches"]) / n_tokens, 2)}
        if spy is None:
            result["pyspy"] = "py-spy not installed (pip install py-spy)"
            return result
        _, err = spy.communicate(timeout=self.cfg.profile_s + 60)
        used = resource.getrusage(resource.RUSAGE_CHILDREN)  # py-spy is the only child reaped meanwhile
        result["pyspy_cores"] = round((used.ru_utime + used.ru_stime - children0) / seconds, 3)
        if spy.returncode != 0 or not out.is_file():
            result["pyspy"] = f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-300:]}"
        else:
            result["pyspy"] = summarize_pyspy(out, seconds)
        return result


def run_capacity(cfg: CapacityConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    from dsjax.bench.emulated_setup import EmulatedCluster, describe_placement, launch_emulated
    from dsjax.bench.experiment import _machine_state
    from dsjax.bench.simcompare import TraceSimulator
    from dsjax.planner.latency import load_profile
    from serving.validation import model_config

    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t_start, started = time.perf_counter(), _machine_state()
    log(f"machine: load average {started['loadavg_1_5_15']} on {started['cpus']} CPUs at {started['time']}")
    slos = SLOs(ttft_s=cfg.ttft_s, tpot_s=cfg.tpot_s, target=cfg.target)
    plan = placement(cfg)
    profile_path = scaled_profile(cfg.profile, cfg.device_speedup, out / f"profile-x{cfg.device_speedup:g}.json")
    cluster = EmulatedCluster(profile_path=profile_path, model=cfg.model, devices=cfg.devices, gpus_per_node=cfg.devices,
                              workers=cfg.workers, max_num_seqs=cfg.max_num_seqs, max_prefill_tokens=cfg.max_prefill_tokens,
                              stream_interval_ms=cfg.stream_interval_ms)
    sim = TraceSimulator(system="disaggregated", profile=load_profile(profile_path), model=cfg.model, slos=slos,
                         max_num_seqs=cfg.max_num_seqs, max_prefill_tokens=cfg.max_prefill_tokens, placement=plan,
                         config=cluster.sim_config(), memory=cluster.memory())
    t0 = time.perf_counter()
    with launch_emulated("disaggregated", plan, cluster, out / "logs", ready_timeout_s=900.0) as launched:
        wait_workers(launched.targets[0], launched.cluster_token, plan.prefill.replicas + plan.decode.replicas, 900.0)
        ready_s = time.perf_counter() - t0
        log(f"server ready in {ready_s:.1f} s: {describe_placement(plan)}, workers {cfg.workers}; "
            f"requests {cfg.prompt_len} + {cfg.output_len} tokens; SLOs TTFT {cfg.ttft_s:g} s, TPOT {cfg.tpot_s:g} s")
        bench = _Bench(cfg, launched, sim, slos, model_config(cfg.model).vocab_size, log)
        bench.load(min(16.0, 4 * cfg.start_rate), max(2.0, 2 * (plan.num_devices) / 16.0), "warmup")
        before = bench.sampler.sample()
        time.sleep(3.0)
        idle = cpu_use(before, bench.sampler.sample())
        log(f"idle: machine {idle['machine_busy']:.2f} cores busy (server {sum(idle['processes'].values()):.2f})")
        rows = bench.ramp()
        passing = [r for r in rows if r["attainment_joint"] >= cfg.target]
        capacity = max((r["rate"] for r in passing), default=0.0)
        prof = bench.profile(capacity or rows[0]["rate"]) if cfg.profile_s > 0 else None
        processes = launched.describe()
    summary = _summary(cfg, rows, capacity, prof, idle, started, ready_s, describe_placement(plan), processes)
    summary["wall_s"] = time.perf_counter() - t_start
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary))
    plot_capacity(rows, out / "capacity.png", target=cfg.target, capacity=capacity or None, cpus=idle["cpus"],
                  title=f"{cfg.model} on {cfg.devices} emulated devices: {summary['placement']}, workers {cfg.workers}, "
                        f"{cfg.prompt_len}+{cfg.output_len} tokens")
    return summary


def _summary(cfg, rows, capacity, prof, idle, started, ready_s, placement_text, processes) -> dict[str, Any]:
    from dsjax.bench.experiment import _machine_state

    at = next((r for r in rows if r["rate"] == capacity), None)
    above = next((r for r in rows if r["rate"] > capacity), None)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    return {
        "config": config, "placement": placement_text, "machine": {"start": started, "end": _machine_state()},
        "idle_cpu": idle, "ready_s": ready_s, "processes": processes, "slo": {"ttft_s": cfg.ttft_s, "tpot_s": cfg.tpot_s,
                                                                             "target": cfg.target},
        "capacity_rate": capacity, "saturated": above is None and capacity > 0,
        "at_capacity": None if at is None else _headline(at), "first_failing": None if above is None else _headline(above),
        "rows": rows, "router_profile": prof, "limit": diagnose(above or at, prof),
    }


def _headline(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("rate", "attainment_joint", "attainment_ttft", "attainment_tpot", "request_rate", "output_token_rate",
            "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")
    return {**{k: r.get(k) for k in keys}, "overhead": r["overhead"], "cpu_groups": r["cpu"]["groups"],
            "cpu_us_per_token": r["cpu_us_per_token"],
            "machine_busy": r["cpu"]["machine_busy"], "busiest_worker": r["cpu"]["busiest_worker"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsjax.bench capacity",
                                description="The request rate the router and workers sustain on emulated devices before "
                                            "their own CPU breaks the SLOs (dsjax/bench/capacity.py).")
    p.add_argument("--emulate", type=Path, required=True, metavar="PROFILE", help="latency profile of the emulated devices")
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--devices", type=int, default=32)
    p.add_argument("--quick", action="store_true",
                   help="rates x2 from 8 req/s, 15 s each, 1 bisection, 10 s profile (~3 min on a quiet host)")
    p.add_argument("--workers", choices=WORKERS, default="processes")
    p.add_argument("--prefill-replicas", type=int, default=None, help="TP1 prefill instances (default: half the devices)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--ttft", type=float, default=0.25, help="TTFT SLO, s (default: DistServe's OPT-13B ShareGPT)")
    p.add_argument("--tpot", type=float, default=0.1, help="TPOT SLO, s")
    p.add_argument("--target-attainment", type=float, default=0.9)
    p.add_argument("--rates", default=None, help="comma-separated rates instead of the ramp")
    p.add_argument("--start-rate", type=float, default=None)
    p.add_argument("--rate-step", type=float, default=None, help="ramp factor (default sqrt 2; --quick 2)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate (default 30; --quick 15)")
    p.add_argument("--bisections", type=int, default=None)
    p.add_argument("--profile-seconds", type=float, default=None, help="py-spy on the router at the capacity (0: skip)")
    p.add_argument("--device-speedup", type=float, default=1.0, help="divide every profile time by this")
    p.add_argument("--stream-interval-ms", type=float, default=0.0)
    p.add_argument("--min-requests", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results/capacity"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    given = dict(start_rate=args.start_rate, rate_step=args.rate_step, duration_s=args.duration,
                 bisections=args.bisections, profile_s=args.profile_seconds)
    settings = {**(QUICK if args.quick else {}), **{k: v for k, v in given.items() if v is not None}}
    cfg = CapacityConfig(profile=args.emulate, model=args.model, devices=args.devices, workers=args.workers,
                         prefill_replicas=args.prefill_replicas, prompt_len=args.prompt_len, output_len=args.output_len,
                         ttft_s=args.ttft, tpot_s=args.tpot, target=args.target_attainment,
                         rates=tuple(float(x) for x in args.rates.split(",")) if args.rates else None,
                         device_speedup=args.device_speedup, stream_interval_ms=args.stream_interval_ms,
                         min_requests=args.min_requests, seed=args.seed, out=args.out, progress=not args.no_progress,
                         **settings)
    s = run_capacity(cfg)
    print(f"capacity {s['capacity_rate']:g} req/s ({s['placement']}, workers {cfg.workers}); results in {cfg.out}")
    print(json.dumps({k: s[k] for k in ("capacity_rate", "saturated", "at_capacity", "first_failing", "wall_s")},
                     indent=1, default=str))
    return 0
