"""Online replanning hook (paper section 4.3): rerun placement when the workload shifts.

The serving side keeps a window of recent (prompt_len, output_len) pairs and the observed arrival
rate, and calls `check_and_replan` periodically. The current placement is simulated on the window's
lengths at that rate; if its SLO attainment falls below the target, the placement search runs on
the window and the result proposes a new placement. Nothing is applied here: the caller decides.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dsjax.placement import Placement
from dsjax.planner.algorithms import ClusterSpec, Plan, algorithm1, algorithm2
from dsjax.planner.latency import Profile
from dsjax.planner.metrics import SLO
from dsjax.planner.models import MemoryModel, ModelSpec
from dsjax.planner.search import GoodputConfig, SearchContext
from dsjax.planner.simulator import SchedulerConfig
from dsjax.planner.trace import PairLengths, generate_trace


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplanResult:
    """What the check found; `proposed` is None when the current placement is good enough."""

    attainment: float  # joint attainment of the current placement on the window at `rate`
    target: float
    rate: float
    current: Placement
    proposed: Placement | None = None
    proposed_goodput: float | None = None  # req/s of the proposed placement
    proposed_attainment: float | None = None  # its attainment on the window at `rate`
    reason: str = ""

    @property
    def needs_replan(self) -> bool:
        return self.attainment < self.target


def check_and_replan(
    *,
    placement: Placement,
    window: Sequence[tuple[int, int]],
    rate: float,
    profile: Profile,
    model: ModelSpec,
    memory: MemoryModel,
    slo: SLO,
    cluster: ClusterSpec,
    affinity: str = "high",
    scheduler: SchedulerConfig = SchedulerConfig(),
    goodput_config: GoodputConfig = GoodputConfig(),
    seed: int = 0,
) -> ReplanResult:
    """Simulate `placement` on `window`'s lengths at `rate` (Poisson); search anew if it misses.

    The proposed placement is sized for `rate` (Algorithm 1 or 2 with that rate); if the cluster
    cannot serve `rate` at all, `proposed` is None and `reason` says why.
    """
    if rate <= 0:
        raise ValueError(f"rate={rate} must be > 0")
    if len(window) == 0:
        raise ValueError("window must hold at least one (prompt_len, output_len) pair")
    if affinity not in ("high", "low"):
        raise ValueError(f"affinity={affinity!r} must be 'high' or 'low'")
    workload = generate_trace(
        num_requests=goodput_config.max_requests, rate=1.0, lengths=PairLengths(pairs=list(window)), seed=seed
    )
    ctx = SearchContext(
        profile=profile, model=model, memory=memory, slo=slo, workload=workload,
        scheduler=scheduler, goodput_config=goodput_config,
    )
    target = goodput_config.attainment_target
    attainment = ctx.run(placement, rate).attainment
    base = dict(attainment=attainment, target=target, rate=rate, current=placement)
    if attainment >= target:
        return ReplanResult(**base, reason=f"attainment {attainment:.3f} >= target {target}")
    try:
        plan: Plan = (algorithm1 if affinity == "high" else algorithm2)(ctx, cluster, rate=rate)
    except ValueError as e:
        return ReplanResult(**base, reason=f"attainment {attainment:.3f} < target {target}; no placement found: {e}")
    new_attainment = ctx.run(plan.placement, rate).attainment
    return ReplanResult(
        **base,
        proposed=plan.placement,
        proposed_goodput=plan.goodput,
        proposed_attainment=new_attainment,
        reason=f"attainment {attainment:.3f} < target {target}; proposing {plan.describe()}",
    )
