"""Which architecture serves a workload best: the planner's disaggregated plan against colocated
and chunked-prefill fleets on the same cluster, and a mixed fleet (disaggregated units plus
colocated instances on the devices the units leave over, or serving the rate's remainder).

Every fleet here is replicas of one unit whose goodput the planner simulated (a disaggregated unit
of Algorithm 1/2, or one colocated / chunked instance from `best_colocated`): replicas share
nothing, so a fleet's goodput is the sum of its units' (the same assumption the algorithms make).

    choice = choose_architecture(disagg_plan, {"colocated": colo, "chunked": chunked}, num_devices=32)
    choice.chosen.architecture      # "disaggregated" | "colocated" | "chunked" | "mixed"
    choice.gain_over("colocated")   # the chosen fleet's goodput over the best colocated fleet's

Without a target rate the cluster is filled and the highest goodput wins: a user with N devices
wants the most requests per second within the SLOs. With a target rate, every fleet is sized for
it and the fewest devices win. Plain Python: no simulation happens here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from dsjax.engine.placement import Placement

ARCHITECTURES = ("disaggregated", "colocated", "chunked", "mixed")
_REL_TIE = 1e-9


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unit:
    """One replicable unit: its placement, simulated goodput (req/s) and devices."""

    architecture: str
    placement: Placement
    goodput: float
    num_devices: int
    max_copies: int | None = None  # how many the cluster's nodes fit (disaggregated: node placement)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES[:3]:
            raise ValueError(f"architecture={self.architecture!r} must be one of {ARCHITECTURES[:3]}")
        if self.num_devices < 1 or self.goodput < 0:
            raise ValueError(f"num_devices={self.num_devices} must be >= 1 and goodput={self.goodput} >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fleet:
    """Copies of one or two units: what the cluster would run."""

    architecture: str
    parts: tuple[tuple[Unit, int], ...]  # (unit, copies)

    @property
    def goodput(self) -> float:
        return sum(u.goodput * k for u, k in self.parts)

    @property
    def num_devices(self) -> int:
        return sum(u.num_devices * k for u, k in self.parts)

    @property
    def per_device_goodput(self) -> float:
        return self.goodput / self.num_devices if self.num_devices else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "goodput": self.goodput, "num_devices": self.num_devices,
                "per_device_goodput": self.per_device_goodput,
                "parts": [{"architecture": u.architecture, "copies": k, "unit_goodput": u.goodput,
                           "unit_devices": u.num_devices, "unit_placement": u.placement.to_dict()}
                          for u, k in self.parts]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchitectureChoice:
    chosen: Fleet
    fleets: tuple[Fleet, ...]  # every architecture that could be built, best first
    rate: float | None  # the target rate the fleets were sized for (None: the cluster filled)
    num_devices: int  # the cluster's

    def fleet(self, architecture: str) -> Fleet | None:
        return next((f for f in self.fleets if f.architecture == architecture), None)

    def gain_over(self, architecture: str) -> float | None:
        """Without a rate: chosen goodput / that fleet's; with one: that fleet's devices / chosen's."""
        other = self.fleet(architecture)
        if other is None:
            return None
        if self.rate is None:
            return self.chosen.goodput / other.goodput if other.goodput > 0 else math.inf
        return other.num_devices / self.chosen.num_devices

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen.architecture, "rate": self.rate, "cluster_devices": self.num_devices,
                "criterion": "fewest devices serving the rate" if self.rate is not None else "highest goodput on the cluster",
                "gain_over": {f.architecture: self.gain_over(f.architecture) for f in self.fleets
                              if f.architecture != self.chosen.architecture},
                "fleets": [f.to_dict() for f in self.fleets]}

    def describe(self) -> str:
        c = self.chosen
        parts = " + ".join(f"{k} x {_unit_text(u)}" for u, k in c.parts)
        others = ", ".join(f"{a} {g:.2f}x" for a, g in self.to_dict()["gain_over"].items() if g is not None)
        measure = "fewer devices than" if self.rate is not None else "the goodput of"
        return (f"chose {c.architecture}: {parts} = {c.goodput:.3g} req/s on {c.num_devices} devices "
                f"({c.per_device_goodput:.3g} per device); {measure}: {others or 'no alternative'}")


def _unit_text(u: Unit) -> str:
    p = u.placement
    if p.mode == "disaggregated":
        return (f"[prefill tp{p.prefill.tp} pp{p.prefill.pp} x{p.prefill.replicas} + decode tp{p.decode.tp} "
                f"pp{p.decode.pp} x{p.decode.replicas}]")
    return f"{p.mode} tp{p.prefill.tp} pp{p.prefill.pp}"


def disaggregated_unit(plan) -> Unit:
    """The replicated unit of an Algorithm 1/2 plan (`dsjax.planner.algorithms.Plan`)."""
    copies = int(plan.details.get("copies", 1))
    unit_goodput = float(plan.details.get("unit_goodput", plan.goodput / copies))
    devices = plan.placement.num_devices // copies
    unit = plan.details.get("unit")
    placement = Placement.from_dict(unit) if isinstance(unit, dict) else plan.placement
    return Unit(architecture="disaggregated", placement=placement, goodput=unit_goodput, num_devices=devices,
                max_copies=copies)


def instance_unit(plan, architecture: str) -> Unit:
    """One colocated / chunked instance (`best_colocated`'s plan)."""
    return Unit(architecture=architecture, placement=plan.placement, goodput=plan.goodput,
                num_devices=plan.placement.num_devices)


def candidate_fleets(units: Mapping[str, Unit], *, num_devices: int, rate: float | None = None) -> list[Fleet]:
    """Every fleet the units make on `num_devices` (sized for `rate` when given; fleets that cannot
    serve it on the cluster are left out)."""
    fleets: list[Fleet] = []
    for arch, u in units.items():
        fit = num_devices // u.num_devices if u.max_copies is None else min(u.max_copies, num_devices // u.num_devices)
        if rate is None:
            copies = fit
        elif u.goodput <= 0:
            continue
        else:
            copies = math.ceil(rate / u.goodput * (1 - _REL_TIE))
            if copies > fit:
                continue
        if copies >= 1:
            fleets.append(Fleet(architecture=arch, parts=((u, copies),)))
    mixed = _mixed(units, num_devices=num_devices, rate=rate)
    if mixed is not None:
        fleets.append(mixed)
    return fleets


def _mixed(units: Mapping[str, Unit], *, num_devices: int, rate: float | None) -> Fleet | None:
    """Disaggregated units, then the best per-device instance on what is left (devices, or rate)."""
    d = units.get("disaggregated")
    inst = max((u for a, u in units.items() if a != "disaggregated" and u.goodput > 0),
               key=lambda u: u.goodput / u.num_devices, default=None)
    if d is None or inst is None or d.goodput <= 0:
        return None
    max_d = num_devices // d.num_devices if d.max_copies is None else d.max_copies
    if rate is None:
        k = max_d
        extra = (num_devices - k * d.num_devices) // inst.num_devices
    else:
        k = min(max_d, math.floor(rate / d.goodput))
        extra = math.ceil(max(0.0, rate - k * d.goodput) / inst.goodput * (1 - _REL_TIE))
        if k * d.num_devices + extra * inst.num_devices > num_devices:
            return None
    if k < 1 or extra < 1:
        return None
    return Fleet(architecture="mixed", parts=((d, k), (inst, extra)))


def choose_architecture(disaggregated, baselines: Mapping[str, Any], *, num_devices: int,
                        rate: float | None = None) -> ArchitectureChoice:
    """The best fleet from the planner's disaggregated plan and the best colocated / chunked
    instances (`baselines`: architecture -> `best_colocated` plan)."""
    units: dict[str, Unit] = {}
    if disaggregated is not None:
        units["disaggregated"] = disaggregated_unit(disaggregated)
    for arch, plan in baselines.items():
        units[arch] = instance_unit(plan, arch)
    fleets = candidate_fleets(units, num_devices=num_devices, rate=rate)
    if not fleets:
        raise ValueError(f"no architecture serves {rate} req/s on {num_devices} devices" if rate is not None
                         else f"no architecture fits {num_devices} devices")
    if rate is None:  # most goodput; ties: fewer devices, then the simpler architecture (listed first)
        key = lambda f: (-f.goodput * (1 - _REL_TIE), f.num_devices, ARCHITECTURES.index(f.architecture))
    else:  # fewest devices; ties: more headroom
        key = lambda f: (f.num_devices, -f.goodput, ARCHITECTURES.index(f.architecture))
    ranked = sorted(fleets, key=key)
    return ArchitectureChoice(chosen=ranked[0], fleets=tuple(ranked), rate=rate, num_devices=num_devices)


def search_architectures(ctx, cluster, disaggregated, *, rate: float | None = None,
                         progress: bool = False) -> ArchitectureChoice:
    """`choose_architecture` with the best colocated and chunked instances searched on the same
    context (same profile: the same engine) as the disaggregated plan."""
    from dsjax.planner.algorithms import best_colocated

    baselines = {mode: best_colocated(ctx, cluster, mode=mode, progress=progress) for mode in ("colocated", "chunked")}
    return choose_architecture(disaggregated, baselines, num_devices=cluster.num_gpus, rate=rate)


def fleet_placement(fleet: Fleet, disaggregated_plan=None) -> Placement:
    """What one server runs for a single-architecture fleet (a mixed fleet: its disaggregated part;
    the colocated replicas beside it are a second server). A disaggregated fleet keeps the plan's
    own node layout when it has as many copies."""
    unit, copies = fleet.parts[0]
    if unit.architecture == "disaggregated":
        if disaggregated_plan is not None and disaggregated_plan.placement.num_devices == unit.num_devices * copies:
            return disaggregated_plan.placement
        p = unit.placement
        return Placement(mode="disaggregated", prefill=dataclasses.replace(p.prefill, replicas=p.prefill.replicas * copies),
                         decode=dataclasses.replace(p.decode, replicas=p.decode.replicas * copies))
    p = unit.placement
    return Placement.colocated(tp=p.prefill.tp, pp=p.prefill.pp, replicas=copies, mode=p.mode)
