"""Goodput of a configuration: the highest request rate whose SLO attainment meets a target.

The workload is a fixed set of requests at mean rate 1 (`trace.resample`); a candidate rate R is
simulated by compressing its arrival times to mean rate R (`trace.rescale_rate`), so every rate sees
the same requests and the same arrival pattern (common random numbers: attainment is then close to
monotone in R and the bisection is stable).

    goodput = max { R : attainment(R) >= target }      found by bracketing and bisection

The bisection stops when (hi - lo) <= rel_tol * hi, and returns lo (a rate that passed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from dsjax.engine.placement import Placement
from dsjax.planner.latency import Profile
from dsjax.planner.model_spec import MemoryModel, ModelSpec
from dsjax.planner.simulator import Phase, SimConfig, Simulator
from dsjax.planner.slo import SLO, SimResult
from dsjax.workloads.trace_gen import Trace, rescale_rate


@dataclasses.dataclass(frozen=True, kw_only=True)
class GoodputConfig:
    """How goodput is measured.

    A rate R is simulated with n(R) = clamp(R * H, min_requests, max_requests) requests, so the run
    lasts about H seconds whatever the rate, and a rate passes when the joint attainment of all
    requests, and of the last `tail_fraction` of arrivals, both reach `attainment_target`.

    H is the longer of `horizon_s` and `lifetimes` mean request lifetimes at the SLO's pace (mean
    output x TPOT SLO; `SearchContext.horizon_s`). A run from an empty system needs that long to
    reach its steady state near the knee: OPT-66B ShareGPT (mean output 325 tokens, TPOT 0.15 s)
    passes 22 req/s on a 73-s trace and only 16 on a 600-s one, where a fixed 60 s or a fixed
    request count gave placements with different per-instance rates different run lengths and so
    different biases (docs/planner.md, "Steady state").
    """

    attainment_target: float = 0.9
    horizon_s: float = 60.0
    lifetimes: float = 12.0
    min_requests: int = 1000
    max_requests: int = 10000
    tail_fraction: float = 0.5
    rel_tol: float = 0.02
    min_rate: float = 1e-3
    max_rate: float = 1e4

    def __post_init__(self) -> None:
        if not 0 < self.attainment_target <= 1:
            raise ValueError(f"attainment_target={self.attainment_target} must be in (0, 1]")
        if self.horizon_s <= 0 or self.lifetimes < 0:
            raise ValueError(f"horizon_s={self.horizon_s} must be > 0 and lifetimes={self.lifetimes} >= 0")
        if not 10 <= self.min_requests <= self.max_requests:
            raise ValueError(f"need 10 <= min_requests <= max_requests, got {self.min_requests=}, {self.max_requests=}")
        if not 0 < self.tail_fraction <= 1:
            raise ValueError(f"tail_fraction={self.tail_fraction} must be in (0, 1]")
        if not 0 < self.rel_tol < 1:
            raise ValueError(f"rel_tol={self.rel_tol} must be in (0, 1)")
        if not 0 < self.min_rate < self.max_rate:
            raise ValueError(f"need 0 < min_rate < max_rate, got {self.min_rate=}, {self.max_rate=}")

    def num_requests(self, rate: float, horizon_s: float | None = None) -> int:
        h = self.horizon_s if horizon_s is None else horizon_s
        return int(min(max(math.ceil(rate * h), self.min_requests), self.max_requests))


def find_goodput(
    attainment_at: Callable[[float], float],
    *,
    target: float = 0.9,
    start: float = 1.0,
    rel_tol: float = 0.02,
    min_rate: float = 1e-3,
    max_rate: float = 1e4,
) -> tuple[float, int]:
    """(highest passing rate, number of evaluations). 0.0 if even `min_rate` fails; `max_rate` if
    that still passes."""
    evals = 0

    def ok(rate: float) -> bool:
        nonlocal evals
        evals += 1
        return attainment_at(rate) >= target

    rate = min(max(start, min_rate), max_rate)
    if ok(rate):
        lo, hi = rate, math.inf
        while hi == math.inf:
            nxt = min(lo * 2.0, max_rate)
            if nxt <= lo:
                return lo, evals
            if ok(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        lo, hi = 0.0, rate
        while lo == 0.0:
            nxt = hi / 2.0
            if nxt < min_rate:
                return 0.0, evals
            if ok(nxt):
                lo = nxt
            else:
                hi = nxt
    while hi - lo > rel_tol * hi:
        mid = math.sqrt(lo * hi) if hi / lo > 1.5 else 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, evals


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SearchContext:
    """Everything a goodput evaluation needs besides the placement; caches results per placement."""

    profile: Profile
    model: ModelSpec
    memory: MemoryModel
    slo: SLO
    workload: Trace  # unit mean rate, >= goodput_config.max_requests requests (see trace.resample)
    scheduler: SimConfig = SimConfig()
    goodput_config: GoodputConfig = GoodputConfig()
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)
    _stats: dict = dataclasses.field(default_factory=lambda: {"simulations": 0}, repr=False)

    @property
    def num_simulations(self) -> int:
        return self._stats["simulations"]

    def simulator(self, placement: Placement, profile: Profile | None = None) -> Simulator:
        return Simulator(
            placement=placement, profile=profile or self.profile, model=self.model, memory=self.memory, config=self.scheduler
        )

    @property
    def horizon_s(self) -> float:
        """Seconds of traffic per simulated rate: `horizon_s`, or `lifetimes` mean request lifetimes
        at the TPOT SLO's pace if longer (GoodputConfig)."""
        cfg = self.goodput_config
        lifetime = float(self.workload.output_len.mean()) * self.slo.tpot_s if math.isfinite(self.slo.tpot_s) else 0.0
        return max(cfg.horizon_s, cfg.lifetimes * lifetime)

    def trace_at(self, rate: float) -> Trace:
        """The workload's first n(rate) requests compressed to mean rate `rate`."""
        return rescale_rate(self.workload.head(self.goodput_config.num_requests(rate, self.horizon_s)), rate)

    def passes(self, result: SimResult) -> bool:
        cfg = self.goodput_config
        return result.attainment >= cfg.attainment_target and result.tail_attainment(cfg.tail_fraction) >= cfg.attainment_target

    def run(self, placement: Placement, rate: float, *, phase: Phase = "both", profile: Profile | None = None) -> SimResult:
        self._stats["simulations"] += 1
        return self.simulator(placement, profile).run(self.trace_at(rate), slo=self.slo, phase=phase)

    def goodput(
        self, placement: Placement, *, phase: Phase = "both", profile: Profile | None = None, start: float | None = None
    ) -> float:
        """Highest rate (req/s, whole placement) meeting the attainment target; cached."""
        key = (repr(placement), phase, id(profile) if profile is not None else None)
        if key in self._cache:
            return self._cache[key]
        sim = self.simulator(placement, profile)
        cfg = self.goodput_config

        def attainment_at(rate: float) -> float:
            self._stats["simulations"] += 1
            result = sim.run(self.trace_at(rate), slo=self.slo, phase=phase)
            return 1.0 if self.passes(result) else 0.0

        if start is None:
            start = self.rate_hint(placement, phase=phase)
        value, _ = find_goodput(
            attainment_at,
            target=0.5,
            start=start,
            rel_tol=cfg.rel_tol,
            min_rate=cfg.min_rate,
            max_rate=cfg.max_rate,
        )
        self._cache[key] = value
        return value

    def rate_hint(self, placement: Placement, *, phase: Phase = "both") -> float:
        """A cheap throughput estimate to start the bracketing near the answer (about half of it)."""
        w = self.workload
        mean_p = float(w.prompt_len.mean())
        mean_o = float(w.output_len.mean())
        pf = placement.prefill
        lat_p = self.profile.latency(self.model.name, tp=pf.tp, pp=pf.pp, use_buckets=self.scheduler.shape_buckets)
        prefill_rate = pf.replicas / max(lat_p.prefill_stage_s(mean_p, mean_p * mean_p), 1e-6)
        dc = placement.decode
        lat_d = self.profile.latency(self.model.name, tp=dc.tp, pp=dc.pp, use_buckets=self.scheduler.shape_buckets)
        cap = self.memory.kv_capacity_tokens(dc.tp, dc.pp) or 1
        if not self.scheduler.kv_capacity_limit:
            cap = 1 << 62
        batch = max(1, min(self.scheduler.decode_max_batch_size, int(cap / (mean_p + mean_o))))
        step = lat_d.decode_step_s(batch, batch * (mean_p + mean_o / 2))
        decode_rate = dc.replicas * batch / max(step * max(mean_o - 1, 1.0), 1e-6)
        if placement.mode != "disaggregated":
            est = 1.0 / (1.0 / prefill_rate + 1.0 / decode_rate)
        elif phase == "prefill":
            est = prefill_rate
        elif phase == "decode":
            est = decode_rate
        else:
            est = min(prefill_rate, decode_rate)
        return max(0.5 * est, self.goodput_config.min_rate)


def replicas_for_rate(rate: float, per_instance_goodput: float) -> int:
    """Algorithm 1's replication: ceil(rate / goodput of one instance)."""
    if per_instance_goodput <= 0:
        raise ValueError(f"per_instance_goodput={per_instance_goodput} must be > 0 to serve rate={rate}")
    n = rate / per_instance_goodput
    return max(1, int(n) if n == int(n) else int(n) + 1)
