"""A rate sweep against one server: run the trace at each rate, bisect for goodput, keep every row.

    sweep = sweep_target("localhost:50051", requests, SweepConfig(rates=(1, 2, 4)), slos, label="dsjax")
    sweep.goodput, sweep.rows, sweep.runs

The same requests (one seeded sample of a real workload) are sent at every rate; the arrival
pattern is one seeded sequence of unit-rate gaps divided by the rate (`loadgen.send_schedule`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from dsjax.bench.analysis import SLOs, run_row, search_goodput, write_requests_jsonl
from dsjax.bench.loadgen import DEFAULT_REQUEST_TIMEOUT_S, StopRule, run_load, send_schedule
from dsjax.bench.records import BenchRequest, LoadRun
from dsjax.workloads.trace_gen import ARRIVAL_PROCESSES


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
    rates: tuple[float, ...]
    arrival: str = "poisson"
    cv: float = 1.0
    seed: int = 0
    bisect: bool = True
    run_all_rates: bool = True  # also run the scan rates above the first failing one (in full)
    rel_tol: float = 0.05  # bisection stops when the bracket is within this fraction of the failing rate
    max_bisections: int = 6
    early_stop: bool = True  # bisection probes stop once they certainly fail
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    connect_timeout_s: float = 30.0
    # Warm-up, not measured: the first `warmup_requests` requests are sent once per entry of
    # `warmup_rates` (None: all at once) so the server compiles the shapes the sweep will touch.
    warmup_requests: int = 0
    warmup_rates: tuple[float | None, ...] = (None,)
    pause_s: float = 0.0  # idle time between runs (lets the server settle)
    # Before each measured run, an unmeasured probe of this many seconds of traffic at the same
    # rate (the first requests, another arrival seed): its step logs tell the simulator how fast
    # the machine is right then, under that load (simcompare.speed_scaled). 0: no probes.
    probe_s: float = 0.0
    # A run lasts this long whatever its rate: rate x duration_s requests (the first of the sample;
    # at least min_requests), so a high rate is sustained load, not a burst the queues absorb. 0: every
    # run sends the whole sample.
    duration_s: float = 0.0
    min_requests: int = 1
    # The first settle_s seconds of each run's schedule load the server but are not measured
    # (LoadRun.measured_from): attainment is that of a server in its steady state, not of one
    # whose queues are still filling. Bisection probes then run in full (no early stop).
    settle_s: float = 0.0
    # Slow motion (serve --emulate-time-scale K): every time above, each schedule, the SLOs and
    # the request timeout are in the cluster's own time; requests go out K x slower and every run
    # is read back at 1/K (LoadRun.time_scaled), so rates and latencies are the cluster's at full
    # speed. 1: real time.
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        rates = tuple(float(r) for r in self.rates)
        object.__setattr__(self, "rates", rates)
        if not rates or any(r <= 0 for r in rates) or any(b <= a for a, b in zip(rates, rates[1:])):
            raise ValueError(f"rates={rates} must be positive and strictly increasing")
        if self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(f"arrival={self.arrival!r} must be one of {ARRIVAL_PROCESSES}")
        if not self.cv > 0:
            raise ValueError(f"cv={self.cv} must be > 0")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests={self.warmup_requests} must be >= 0")
        if self.probe_s < 0:
            raise ValueError(f"probe_s={self.probe_s} must be >= 0")
        if self.duration_s < 0 or self.min_requests < 1:
            raise ValueError(f"duration_s={self.duration_s} must be >= 0 and min_requests={self.min_requests} >= 1")
        if self.settle_s < 0 or (self.settle_s and self.settle_s >= self.duration_s):
            raise ValueError(f"settle_s={self.settle_s} must be >= 0 and below duration_s={self.duration_s}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale={self.time_scale} must be > 0")

    def requests_at(self, rate: float, available: int) -> int:
        """How many of `available` requests a run at `rate` sends."""
        return requests_at(rate, available, duration_s=self.duration_s, min_requests=self.min_requests)


def settled_index(offsets_s: Sequence[float], settle_s: float) -> int:
    """The first request scheduled at or after `settle_s` (offsets ascending): the first measured."""
    return bisect.bisect_left(list(offsets_s), settle_s)


def requests_at(rate: float, available: int, *, duration_s: float, min_requests: int = 1) -> int:
    """A run of `duration_s` seconds at `rate` (at least `min_requests`, at most `available`;
    duration_s 0: all of them)."""
    if duration_s <= 0:
        return available
    return min(available, max(min_requests, math.ceil(rate * duration_s)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepResult:
    label: str
    goodput: float
    saturated: bool  # every scanned rate passed: the goodput may be higher
    probes: tuple[tuple[float, float], ...]  # (rate, joint attainment) in probe order
    runs: tuple[LoadRun, ...]
    rows: tuple[dict[str, Any], ...]  # one per run, sorted by rate
    warmup_runs: tuple[LoadRun, ...] = ()  # not measured; in warm-up order
    warmup_window: tuple[float, float] | None = None  # wall-clock (time.time()) start and end of the warm-up
    # rate -> wall-clock window of the speed probe run just before the measured run at that rate
    probe_windows: dict[float, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def run_at(self, rate: float) -> LoadRun | None:
        return next((r for r in self.runs if r.rate == rate), None)

    def full_rows(self) -> list[dict[str, Any]]:
        """Rows of runs that were not stopped early (their attainment is exact)."""
        return [r for r in self.rows if not r["stopped_early"]]


def sweep_target(
    target: str | Sequence[str],
    requests: Sequence[BenchRequest],
    config: SweepConfig,
    slos: SLOs,
    *,
    label: str = "server",
    labels: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    counters: Callable[[], dict[str, float]] | None = None,
) -> SweepResult:
    """Scan `config.rates` (and bisect, unless `config.bisect` is False) against `target`.

    With `out_dir`, every run's requests go to `requests-<label>-<rate>.jsonl` there. With
    `counters`, each run records what they counted over it (`LoadRun.server_counters`).
    """
    labels = {"system": label, **(labels or {})}
    n = len(requests)
    k_time = config.time_scale

    def load(reqs, offsets, *, rate, stop_rule=None, tag) -> LoadRun:
        """One run_load, in slow motion when time_scale != 1 (read back at full speed by the caller)."""
        if stop_rule is not None and k_time != 1:
            stop_rule = dataclasses.replace(stop_rule, ttft_slo_s=stop_rule.ttft_slo_s * k_time,
                                            tpot_slo_s=stop_rule.tpot_slo_s * k_time)
        return run_load(target, reqs, [o * k_time for o in offsets], rate=rate, stop_rule=stop_rule,
                        timeout_s=config.timeout_s * k_time, connect_timeout_s=config.connect_timeout_s,
                        progress=progress, tag=tag)

    k = min(config.warmup_requests, n)
    warmup_runs = []
    warm_start = time.time()
    for rate in config.warmup_rates if k else ():
        offsets = [0.0] * k if rate is None else send_schedule(k, rate=rate, seed=config.seed + 1)
        log(f"[{label}] warm-up: {k} requests {'at once' if rate is None else f'at {rate:g} req/s'} (not measured)")
        warmup_runs.append(load(requests[:k], offsets, rate=rate or math.inf, tag=f"{label}-warmup").time_scaled(1 / k_time))
    warmup_window = (warm_start, time.time()) if warmup_runs else None
    stop_rule = StopRule(ttft_slo_s=slos.ttft_s, tpot_slo_s=slos.tpot_s, target=slos.target)
    probe_windows: dict[float, tuple[float, float]] = {}

    def run_at(rate: float, early_stop: bool) -> LoadRun:
        before = counters() if counters is not None else None
        run = _run_at(rate, early_stop)
        if counters is not None:
            after = counters()
            run = dataclasses.replace(run, server_counters={k: after[k] - before.get(k, 0) for k in after})
        return run.time_scaled(1 / k_time)

    def _run_at(rate: float, early_stop: bool) -> LoadRun:
        if config.pause_s:
            time.sleep(config.pause_s)
        if config.probe_s > 0:
            k = min(n, max(20, math.ceil(rate * config.probe_s)))
            start = time.time()
            load(requests[:k], send_schedule(k, rate=rate, seed=config.seed + 2), rate=rate, tag=f"{label}-probe")
            probe_windows[rate] = (start, time.time())
        m = config.requests_at(rate, n)
        offsets = send_schedule(m, rate=rate, arrival=config.arrival, cv=config.cv, seed=config.seed)
        if config.settle_s > 0:
            run = load(requests[:m], offsets, rate=rate, tag=f"{label}-{rate:.4g}")
            return dataclasses.replace(run, measured_from=settled_index(offsets, config.settle_s))
        return load(requests[:m], offsets, rate=rate, stop_rule=stop_rule if early_stop and config.early_stop else None,
                    tag=f"{label}-{rate:.4g}")

    def on_run(run: LoadRun) -> None:
        row = run_row(run, slos, **labels)
        log(f"[{label}] {run.rate:.4g} req/s: attainment {row['attainment_joint']:.1%} (TTFT {row['attainment_ttft']:.1%}, "
            f"TPOT {row['attainment_tpot']:.1%}){' [stopped early]' if run.stopped_early else ''}; "
            f"TTFT p90 {row['ttft_p90_s']:.3f} s, TPOT p90 {row['tpot_p90_s'] * 1e3:.1f} ms; {run.wall_s:.0f} s"
            + (f"; {row['num_failed']} failed: {row['first_error']}" if row["num_failed"] else ""))
        if out_dir is not None:
            write_requests_jsonl(Path(out_dir) / f"requests-{label}-{run.rate:.4g}.jsonl", run, **labels)

    search = search_goodput(run_at, config.rates, slos, rel_tol=config.rel_tol,
                            max_bisections=config.max_bisections if config.bisect else 0, on_run=on_run)
    runs = list(search.runs)
    if config.run_all_rates:  # the scan stops at the first failing rate; run the rest for the plots
        for rate in config.rates:
            if all(r.rate != rate for r in runs):
                runs.append(run_at(rate, False))
                on_run(runs[-1])
    rows = tuple(sorted((run_row(r, slos, **labels) for r in runs), key=lambda row: row["rate"]))
    return SweepResult(label=label, goodput=search.rate, saturated=search.result.saturated, probes=search.result.probes,
                       runs=tuple(runs), rows=rows, warmup_runs=tuple(warmup_runs), warmup_window=warmup_window,
                       probe_windows=probe_windows)

