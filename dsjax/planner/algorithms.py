"""DistServe's placement algorithms (paper section 4.1-4.2) and the colocated baseline search.

Algorithm 1, high node-affinity (fast links everywhere): for every legal (TP, PP) simulate one
prefill instance alone against the TTFT SLO and one decode instance alone against the TPOT SLO,
binary-searching each one's goodput; keep the best prefill and the best decode config by goodput
per device, independently. Replicate: n = ceil(R / prefill goodput), m = ceil(R / decode goodput)
for a target rate R; without R, pick the n:m (within the cluster) with the best estimated
min(n g_p, m g_d) / devices, confirm the top few by simulating them jointly, and repeat that unit
to fill the cluster.

Algorithm 2, low node-affinity (slow links across nodes): for each inter-node pipeline degree P,
every node holds the same layer range (1/P of the model) for a set of prefill segments and decode
segments, so KV moves only inside nodes. Enumerate intra-node choices: prefill (tp, local pp) x n,
decode (tp, local pp) x m, using at most the node's GPUs; the instances then have pp = local pp * P.
Each candidate unit (P nodes' worth) is simulated as a whole disaggregated system; the best goodput
per device wins. Candidates are visited in order of an upper bound, min(n g_p, m g_d) / devices from
the single-phase goodputs, and the walk stops once the bound (times a slack) falls below the best
simulated value: the same answer as trying all, at a fraction of the cost.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from typing import Any, Iterable

from tqdm import tqdm

from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.planner.latency import Profile
from dsjax.planner.model_spec import parallel_config_error
from dsjax.planner.search import SearchContext, replicas_for_rate

BOUND_SLACK = 1.25  # Algorithm 2 keeps simulating while bound * slack > best found
TIE_TOL = 0.05  # per-device goodputs this close count as equal (search tolerance + sampling noise)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    num_nodes: int = 1
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"num_nodes={self.num_nodes} and gpus_per_node={self.gpus_per_node} must be >= 1")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseCandidate:
    """Goodput of one instance of one phase, simulated alone."""

    phase: str
    tp: int
    pp: int
    goodput: float

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    @property
    def per_device(self) -> float:
        return self.goodput / self.num_devices


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A searched placement with its simulated goodput (req/s) for the whole placement."""

    placement: Placement
    goodput: float
    per_device_goodput: float
    algorithm: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        p = self.placement
        if p.mode != "disaggregated":
            return f"{p.mode} tp={p.prefill.tp} pp={p.prefill.pp} x{p.prefill.replicas}"
        return (
            f"prefill tp={p.prefill.tp} pp={p.prefill.pp} x{p.prefill.replicas}, "
            f"decode tp={p.decode.tp} pp={p.decode.pp} x{p.decode.replicas}"
        )


class _Progress:
    """tqdm on stderr, or nothing."""

    def __init__(self, enabled: bool, desc: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True) if enabled else None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def legal_configs(ctx: SearchContext, cluster: ClusterSpec, *, max_devices: int | None = None) -> list[tuple[int, int]]:
    """(tp, pp) pairs with a profile entry, legal shapes, TP within a node, and weights that fit."""
    limit = max_devices if max_devices is not None else cluster.num_gpus
    out = []
    for tp in ctx.profile.tp_degrees(ctx.model.name):
        for pp in _divisors(ctx.model.num_layers):
            if tp * pp > limit or parallel_config_error(ctx.model, tp=tp, pp=pp, gpus_per_node=cluster.gpus_per_node):
                continue
            if ctx.memory.kv_capacity_tokens(tp, pp):
                out.append((tp, pp))
    return out


def _phase_placement(tp: int, pp: int) -> Placement:
    ph = PhaseParallel(tp=tp, pp=pp)
    return Placement(prefill=ph, decode=ph)


def phase_table(
    ctx: SearchContext, configs: Iterable[tuple[int, int]], phase: str, progress: _Progress | None = None
) -> list[PhaseCandidate]:
    """Single-instance goodput of `phase` ("prefill" or "decode") for every config."""
    out = []
    for tp, pp in configs:
        g = ctx.goodput(_phase_placement(tp, pp), phase=phase)  # type: ignore[arg-type]
        out.append(PhaseCandidate(phase=phase, tp=tp, pp=pp, goodput=g))
        if progress:
            progress.update()
    return out


def _best(cands: list[PhaseCandidate], tie_tol: float = TIE_TOL) -> PhaseCandidate:
    """Best goodput per device; among configs within `tie_tol` of it (differences the search cannot
    resolve), the one with the fewest devices (finer replication), then the highest goodput."""
    top = max(c.per_device for c in cands)
    close = [c for c in cands if c.per_device >= (1 - tie_tol) * top]
    return min(close, key=lambda c: (c.num_devices, -c.per_device))


UNITS: tuple[str, ...] = ("balanced", "pair")


def algorithm1(
    ctx: SearchContext,
    cluster: ClusterSpec,
    *,
    rate: float | None = None,
    unit: str = "balanced",
    progress: bool = False,
    top_k: int = 3,
) -> Plan:
    """High node-affinity placement (paper Algorithm 1).

    unit="balanced" (default): independent best configs, replicated n:m as described above.
    unit="pair": the public code's methodology, one prefill + one decode instance simulated
    together, best goodput / (devices of the pair); `rate` is ignored.
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} must be one of {UNITS}")
    configs = legal_configs(ctx, cluster)
    if not configs:
        raise ValueError(f"no (tp, pp) of {ctx.model.name} fits a {cluster.gpus_per_node}-GPU node / {cluster.num_gpus} GPUs")
    bar = _Progress(progress, "algorithm 1", 2 * len(configs) + top_k + 1)
    try:
        prefill = phase_table(ctx, configs, "prefill", bar)
        decode = phase_table(ctx, configs, "decode", bar)
        if unit == "pair":
            return _best_pair(ctx, cluster, prefill, decode, progress)
        bp, bd = _best(prefill), _best(decode)
        if bp.goodput <= 0 or bd.goodput <= 0:
            raise ValueError(
                f"no config meets the SLOs even at low load: best prefill {bp.goodput:.3g} req/s, best decode {bd.goodput:.3g} req/s"
            )
        details: dict[str, Any] = {
            "prefill_table": [dataclasses.asdict(c) | {"per_device": c.per_device} for c in prefill],
            "decode_table": [dataclasses.asdict(c) | {"per_device": c.per_device} for c in decode],
        }
        if rate is not None:
            n, m = replicas_for_rate(rate, bp.goodput), replicas_for_rate(rate, bd.goodput)
            placement = _disagg(bp, n, bd, m)
            if placement.num_devices > cluster.num_gpus:
                raise ValueError(
                    f"rate={rate} needs {n} x prefill tp={bp.tp} pp={bp.pp} + {m} x decode tp={bd.tp} pp={bd.pp} = "
                    f"{placement.num_devices} GPUs, the cluster has {cluster.num_gpus}"
                )
            g = ctx.goodput(placement)
            bar.update(top_k + 1)
            details.update(unit=placement.to_dict(), copies=1, attainment_at_rate=ctx.run(placement, rate).attainment)
            return Plan(placement=placement, goodput=g, per_device_goodput=g / placement.num_devices, algorithm="high", details=details)
        # No rate: the smallest n:m whose estimated per-device goodput min(n g_p, m g_d) / devices is
        # within TIE_TOL of the best estimate; the top few are simulated jointly and the best per
        # device is repeated to fill the cluster. The independent best configs are used when the two
        # fit the cluster together; otherwise the best-estimated pair that fits.
        units = []
        for p in prefill:
            for d in decode:
                if p.goodput <= 0 or d.goodput <= 0:
                    continue
                for n in range(1, cluster.num_gpus // p.num_devices + 1):
                    for m in range(1, (cluster.num_gpus - n * p.num_devices) // d.num_devices + 1):
                        devices = n * p.num_devices + m * d.num_devices
                        est = min(n * p.goodput, m * d.goodput) / devices
                        units.append((p is bp and d is bd, est, n, m, p, d))
        if not units:
            raise ValueError(f"no prefill + decode pair of {ctx.model.name} fits {cluster.num_gpus} GPUs and meets the SLOs")
        if any(u[0] for u in units):
            units = [u for u in units if u[0]]
        top_est = max(u[1] for u in units)
        units = sorted((u for u in units if u[1] >= (1 - TIE_TOL) * top_est), key=lambda u: (u[2] + u[3], -u[1]))
        best: tuple[float, Placement, float] | None = None
        for _, _, n, m, p, d in units[:top_k]:
            unit_pl = _disagg(p, n, d, m)
            g = ctx.goodput(unit_pl)
            bar.update()
            if best is None or g / unit_pl.num_devices > best[0] * (1 + 1e-9):
                best = (g / unit_pl.num_devices, unit_pl, g)
                bp, bd = p, d
        assert best is not None
        per_device, unit, g_unit = best
        copies = cluster.num_gpus // unit.num_devices
        pair = _disagg(bp, 1, bd, 1)
        g_pair = ctx.goodput(pair)
        bar.update()
        details.update(
            unit=unit.to_dict(), unit_goodput=g_unit, copies=copies,
            pair_goodput=g_pair, pair_per_device_goodput=g_pair / pair.num_devices,
        )
        placement = _disagg(bp, unit.prefill.replicas * copies, bd, unit.decode.replicas * copies)
        return Plan(placement=placement, goodput=g_unit * copies, per_device_goodput=per_device, algorithm="high", details=details)
    finally:
        bar.close()


def _best_pair(
    ctx: SearchContext, cluster: ClusterSpec, prefill: list[PhaseCandidate], decode: list[PhaseCandidate], progress: bool
) -> Plan:
    """Best 1:1 pair by simulated joint goodput per device, visiting pairs by the upper bound
    min(g_p, g_d) / devices and stopping once bound * BOUND_SLACK <= best (as in algorithm2)."""
    cands = []
    for p in prefill:
        for d in decode:
            devices = p.num_devices + d.num_devices
            if devices <= cluster.num_gpus and min(p.goodput, d.goodput) > 0:
                cands.append((min(p.goodput, d.goodput) / devices, devices, p, d))
    if not cands:
        raise ValueError(f"no prefill + decode pair of {ctx.model.name} fits {cluster.num_gpus} GPUs and meets the SLOs")
    cands.sort(key=lambda c: (-c[0], c[1]))
    best: tuple[float, Placement, float] | None = None
    visited = 0
    bar = _Progress(progress, "pairs", len(cands))
    try:
        for bound, _, p, d in cands:
            if best is not None and bound * BOUND_SLACK <= best[0]:
                break
            pair = _disagg(p, 1, d, 1)
            g = ctx.goodput(pair)
            visited += 1
            bar.update()
            if best is None or g / pair.num_devices > best[0] * (1 + 1e-9):
                best = (g / pair.num_devices, pair, g)
    finally:
        bar.close()
    assert best is not None
    per_device, pair, g = best
    details = {
        "unit": pair.to_dict(), "copies": 1, "candidates": len(cands), "candidates_simulated": visited,
        "prefill_table": [dataclasses.asdict(c) | {"per_device": c.per_device} for c in prefill],
        "decode_table": [dataclasses.asdict(c) | {"per_device": c.per_device} for c in decode],
    }
    return Plan(placement=pair, goodput=g, per_device_goodput=per_device, algorithm="high-pair", details=details)


def _disagg(p: PhaseCandidate, n: int, d: PhaseCandidate, m: int) -> Placement:
    return Placement(prefill=PhaseParallel(tp=p.tp, pp=p.pp, replicas=n), decode=PhaseParallel(tp=d.tp, pp=d.pp, replicas=m))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Unit:
    inter_pp: int  # P: nodes one unit spans (one layer range per node)
    prefill: tuple[int, int, int]  # (tp, local pp, count per node)
    decode: tuple[int, int, int]

    @property
    def gpus_per_node(self) -> int:
        (tp_p, lp_p, n), (tp_d, lp_d, m) = self.prefill, self.decode
        return n * tp_p * lp_p + m * tp_d * lp_d

    @property
    def num_devices(self) -> int:
        return self.inter_pp * self.gpus_per_node

    def placement(self) -> Placement:
        (tp_p, lp_p, n), (tp_d, lp_d, m) = self.prefill, self.decode
        P = self.inter_pp
        return Placement(
            prefill=PhaseParallel(tp=tp_p, pp=lp_p * P, replicas=n), decode=PhaseParallel(tp=tp_d, pp=lp_d * P, replicas=m)
        )


def algorithm2(
    ctx: SearchContext, cluster: ClusterSpec, *, rate: float | None = None, unit: str = "balanced", progress: bool = False
) -> Plan:
    """Low node-affinity placement (paper Algorithm 2). unit="pair" restricts a unit to one prefill
    and one decode instance (the public code's search)."""
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} must be one of {UNITS}")
    max_count = 1 if unit == "pair" else cluster.gpus_per_node
    G = cluster.gpus_per_node
    configs = legal_configs(ctx, cluster)
    segs_by_P: dict[int, list[tuple[int, int]]] = {}
    for P in _divisors(ctx.model.num_layers):
        if P > cluster.num_nodes:
            continue
        segs = [(tp, pp // P) for tp, pp in configs if pp % P == 0 and tp * (pp // P) <= G]
        if segs:
            segs_by_P[P] = segs
    needed = sorted({(tp, lp * P) for P, segs in segs_by_P.items() for tp, lp in segs})
    if not needed:
        raise ValueError(f"no (tp, pp) of {ctx.model.name} fits {cluster.num_nodes} x {G} GPUs")
    bar = _Progress(progress, "algorithm 2", 2 * len(needed))
    try:
        g_p = {(c.tp, c.pp): c.goodput for c in phase_table(ctx, needed, "prefill", bar)}
        g_d = {(c.tp, c.pp): c.goodput for c in phase_table(ctx, needed, "decode", bar)}
    finally:
        bar.close()
    cands: list[tuple[float, _Unit]] = []
    for P, segs in segs_by_P.items():
        for (tp_p, lp_p), (tp_d, lp_d) in itertools.product(segs, segs):
            dp, dd = tp_p * lp_p, tp_d * lp_d
            for n in range(1, min(G // dp, max_count) + 1):
                for m in range(1, min((G - n * dp) // dd, max_count) + 1):
                    cand = _Unit(inter_pp=P, prefill=(tp_p, lp_p, n), decode=(tp_d, lp_d, m))
                    bound = min(n * g_p[(tp_p, lp_p * P)], m * g_d[(tp_d, lp_d * P)]) / cand.num_devices
                    if bound > 0:
                        cands.append((bound, cand))
    if not cands:
        raise ValueError("no unit meets the SLOs even at low load")
    cands.sort(key=lambda c: (-c[0], c[1].num_devices))
    best: tuple[float, _Unit, float] | None = None
    visited = 0
    bar = _Progress(progress, "algorithm 2 units", len(cands))
    try:
        for bound, cand in cands:
            if best is not None and bound * BOUND_SLACK <= best[0]:
                break
            g = ctx.goodput(cand.placement())
            visited += 1
            bar.update()
            if best is None or g / cand.num_devices > best[0] * (1 + 1e-9):
                best = (g / cand.num_devices, cand, g)
    finally:
        bar.close()
    assert best is not None
    per_device, best_unit, g_unit = best
    slots_per_group = G // best_unit.gpus_per_node
    max_units = (cluster.num_nodes // best_unit.inter_pp) * slots_per_group
    if rate is not None:
        copies = replicas_for_rate(rate, g_unit)
        if copies > max_units:
            raise ValueError(
                f"rate={rate} needs {copies} units of {best_unit.num_devices} GPUs ({g_unit:.3g} req/s each); "
                f"the cluster fits {max_units}"
            )
    else:
        copies = max_units
    placement = _place_units(best_unit, copies, G, slots_per_group)
    details = {
        "unit": best_unit.placement().to_dict(),
        "inter_node_pp": best_unit.inter_pp,
        "unit_goodput": g_unit,
        "copies": copies,
        "candidates": len(cands),
        "candidates_simulated": visited,
        "prefill_goodputs": {f"tp{k[0]}pp{k[1]}": v for k, v in g_p.items()},
        "decode_goodputs": {f"tp{k[0]}pp{k[1]}": v for k, v in g_d.items()},
    }
    return Plan(placement=placement, goodput=g_unit * copies, per_device_goodput=per_device, algorithm="low" if unit == "balanced" else "low-pair", details=details)


def _place_units(unit: _Unit, copies: int, gpus_per_node: int, slots_per_group: int) -> Placement:
    """Explicit device ids (node * gpus_per_node + local) so that every node holds one layer range of
    both phases: instance stage s = node k * local_pp + local stage j, listed stage-major."""
    (tp_p, lp_p, n), (tp_d, lp_d, m) = unit.prefill, unit.decode
    P = unit.inter_pp
    prefill_devs: list[tuple[int, ...]] = []
    decode_devs: list[tuple[int, ...]] = []
    for u in range(copies):
        group, slot = divmod(u, slots_per_group)
        offset = slot * unit.gpus_per_node
        local = offset
        for count, tp, lp, out in ((n, tp_p, lp_p, prefill_devs), (m, tp_d, lp_d, decode_devs)):
            for _ in range(count):
                ids: list[int] = []
                for k in range(P):
                    base = (group * P + k) * gpus_per_node + local
                    ids.extend(base + j for j in range(tp * lp))
                out.append(tuple(ids))
                local += tp * lp
    return Placement(
        prefill=PhaseParallel(tp=tp_p, pp=lp_p * P, replicas=n * copies, devices=tuple(prefill_devs)),
        decode=PhaseParallel(tp=tp_d, pp=lp_d * P, replicas=m * copies, devices=tuple(decode_devs)),
    )


def best_colocated(
    ctx: SearchContext,
    cluster: ClusterSpec,
    *,
    mode: str = "colocated",
    profile: Profile | None = None,
    progress: bool = False,
) -> Plan:
    """Best single colocated (vLLM-like) or chunked instance by goodput per device."""
    if mode not in ("colocated", "chunked"):
        raise ValueError(f"mode={mode!r} must be 'colocated' or 'chunked'")
    prof = profile or ctx.profile
    sub = dataclasses.replace(ctx, profile=prof, _cache={}, _stats=ctx._stats)
    configs = legal_configs(sub, cluster)
    bar = _Progress(progress, f"{mode} baseline", len(configs))
    best: Plan | None = None
    table = []
    try:
        for tp, pp in configs:
            placement = Placement.colocated(tp=tp, pp=pp, mode=mode)
            g = sub.goodput(placement)
            bar.update()
            table.append({"tp": tp, "pp": pp, "goodput": g, "per_device": g / (tp * pp)})
            if best is None or g / (tp * pp) > best.per_device_goodput * (1 + 1e-9):
                best = Plan(placement=placement, goodput=g, per_device_goodput=g / (tp * pp), algorithm=mode)
    finally:
        bar.close()
    if best is None:
        raise ValueError(f"no colocated config of {ctx.model.name} fits")
    return dataclasses.replace(best, details={"table": table, "profile": prof.source})


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf
