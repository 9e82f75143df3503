"""DistServe semantics: the public simulator (LLMServe/DistServe `simdistserve/`, commit 82831f1).

`python -m dsjax.plan simulate|search --semantics distserve` runs this instead of `Simulator`. Rules
(ms; shared/docs/distserve-simulator.md; checked request by request against that program):
- Prefill per pipeline stage (a + b·Σl + c·Σl²)/pp + pp; decode per stage (a + b·Σ(ctx+1) + c·B)/pp,
  `decoding_smallbs` below 95 requests. The first stage of every iteration also pays the "Ray
  overhead" 2 + 0.0001·Σctx (prefill: Σ prompt; decode: Σ ctx).
- An instance is a ring of pp workers (stages), each with a prefill and a decode queue, looping: a
  prefill iteration if its prefill queue is not empty, else a decode one. Stage 0 batches whole
  prompts FCFS while Σprompt ≤ max_num_tokens(tp, pp) (no L_m); later stages take the batch handed
  on. Decode takes the queue head FCFS while Σ(ctx+1) ≤ 50,000 (and ≤ max_num_tokens requests);
  the last stage puts those that ran back at the tail (leftovers stay at the head). No KV limit.
- Disaggregated: the last prefill stage hands each request at once (KV transfer is free) to the
  decode instance with the shortest queue. Colocated ("vllm"): one instance runs both phases with
  the profile given (its vLLM profile), strict prefill priority.
- TTFT = end of the prefill's last stage − arrival; TPOT = (exit − end of prefill)/output_len. Its
  bisection passes a rate when P90 TTFT and P90 TPOT are under their SLOs, apart (`percentiles_pass`).
Deviations, unreachable with prompt + output < 2,048: a prompt over max_num_tokens or a prompt +
output over 50,000 is left unserved (DistServe loops on empty batches); its decode back-pressure
check (9,000,000 queued context tokens) is not modelled.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.planner.events import EventLoop
from dsjax.planner.latency import LatencyCoeffs, Profile
from dsjax.planner.model_spec import MemoryModel, ModelSpec, parallel_config_error
from dsjax.planner.search import SearchContext
from dsjax.planner.simulator import Phase
from dsjax.planner.slo import SLO, SimResult
from dsjax.workloads.trace_gen import Trace

if TYPE_CHECKING:  # algorithms is imported where used: it sits above search, and plan.py imports both
    from dsjax.planner.algorithms import ClusterSpec, Plan

DECODE_TOKEN_CAP = 50_000  # Σ(ctx + 1) of one decode iteration (hard-coded in its worker)
RAY_BASE_MS, RAY_PER_TOKEN_MS = 2.0, 1e-4
SEMANTICS, CRITERIA = ("dsjax", "distserve"), ("p90", "joint")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstanceSpec:
    role: str  # "prefill", "decode" or "both" (vLLM)
    coeffs: LatencyCoeffs
    pp: int
    max_num_tokens: int  # prefill batch token cap; also the decode batch's request-count cap


class _Worker:
    """One pipeline stage of one instance."""

    __slots__ = ("spec", "stage", "last", "next", "prefill_q", "decode_q", "busy", "wake_pending", "prefill_ips")

    def __init__(self, spec: InstanceSpec, stage: int) -> None:
        self.spec, self.stage, self.last = spec, stage, stage == spec.pp - 1
        self.next: _Worker = self
        self.prefill_q: deque = deque()  # stage 0: request ids; later stages: (batch, stage ms)
        self.decode_q: deque[int] = deque()
        self.busy = self.wake_pending = False
        self.prefill_ips = 0  # requests of the prefill batch in progress (the scheduler's load)


def _ring(spec: InstanceSpec) -> _Worker:
    """The instance's stages, the last one's `next` being the first; returns the first."""
    workers = [_Worker(spec, i) for i in range(spec.pp)]
    for i, w in enumerate(workers):
        w.next = workers[(i + 1) % len(workers)]
    return workers[0]


def decode_stage_ms(coeffs: LatencyCoeffs, pp: int, batch: int, sum_ctx_plus_1: float) -> float:
    a, b, c = coeffs.decode_coeffs(batch)
    return (a + b * sum_ctx_plus_1 + c * batch) / pp


def ray_overhead_ms(sum_ctx: float) -> float:
    return RAY_BASE_MS + RAY_PER_TOKEN_MS * sum_ctx  # on the first stage of every iteration


class _Run:
    """The state of one simulation (times in ms)."""

    def __init__(self, prefills: list[InstanceSpec], decodes: list[InstanceSpec], trace: Trace) -> None:
        self.loop = EventLoop()
        self.arrival = (trace.arrival_s * 1e3).tolist()
        self.prompt, self.output = trace.prompt_len.tolist(), trace.output_len.tolist()
        n = len(self.prompt)
        # decode iterations done (DistServe's request counter), end of prefill, exit
        self.done, self.first, self.finish = [0] * n, [math.inf] * n, [math.inf] * n
        self.prefill_heads, self.decode_heads = [_ring(s) for s in prefills], [_ring(s) for s in decodes]
        self.num_iterations = 0

    def run(self) -> None:
        cap = self.prefill_heads[0].spec.max_num_tokens
        for rid, t in enumerate(self.arrival):
            if self.prompt[rid] <= cap and self.prompt[rid] + self.output[rid] <= DECODE_TOKEN_CAP:
                self.loop.at(t, self._arrive, rid)
        self.loop.run()

    def _arrive(self, t: float, rid: int) -> None:
        heads = self.prefill_heads
        w = heads[0] if len(heads) == 1 else min(heads, key=lambda h: h.prefill_ips + len(h.prefill_q))
        w.prefill_q.append(rid)
        self._wake(t, w)

    def _wake(self, t: float, w: _Worker) -> None:
        """simpy's wakeup(): an idle worker resumes at t, after the events already due at t."""
        if not w.busy and not w.wake_pending:
            w.wake_pending = True
            self.loop.at(t, self._resume, w)

    def _resume(self, t: float, w: _Worker) -> None:
        w.wake_pending = False
        self._step(t, w)

    def _step(self, t: float, w: _Worker) -> None:
        """The worker's loop: prefill first, else decode, else wait for a wakeup."""
        if w.busy:
            return
        if w.prefill_q:
            self._start_prefill(t, w)
        elif w.decode_q:
            self._start_decode(t, w)

    def _start_prefill(self, t: float, w: _Worker) -> None:
        spec = w.spec
        if w.stage == 0:
            q, prompt, budget, batch = w.prefill_q, self.prompt, spec.max_num_tokens, []
            while q and prompt[q[0]] <= budget:
                rid = q.popleft()
                budget -= prompt[rid]
                batch.append(rid)
            (a, b, c), sum_len = spec.coeffs.prefill, spec.max_num_tokens - budget
            ms = (a + b * sum_len + c * sum(prompt[r] * prompt[r] for r in batch)) / spec.pp + spec.pp  # every stage
            elapsed = ms + ray_overhead_ms(sum_len)
        else:
            batch, ms = w.prefill_q.popleft()
            elapsed = ms  # the first stage's overhead is not repeated
        w.busy, w.prefill_ips = True, len(batch)
        self.num_iterations += 1
        self.loop.at(t + elapsed, self._end_prefill, (w, batch, ms))

    def _end_prefill(self, t: float, arg: tuple) -> None:
        w, batch, ms = arg
        w.prefill_ips = 0
        if not w.last:
            w.next.prefill_q.append((batch, ms))
            self._wake(t, w.next)
        else:
            first, decodes = self.first, self.decode_heads
            for rid in batch:
                first[rid] = t
            if w.spec.role == "both":
                w.next.decode_q.extend(batch)
                self._wake(t, w.next)
            else:
                for rid in batch:
                    d = decodes[0] if len(decodes) == 1 else min(decodes, key=lambda h: len(h.decode_q))
                    d.decode_q.append(rid)
                    self._wake(t, d)
        w.busy = False
        self._step(t, w)

    def _start_decode(self, t: float, w: _Worker) -> None:
        spec, q, prompt, done = w.spec, w.decode_q, self.prompt, self.done
        budget, limit, batch = DECODE_TOKEN_CAP, spec.max_num_tokens, []
        while q and len(batch) < limit:
            need = prompt[q[0]] + done[q[0]] + 1
            if need > budget:
                break
            budget -= need
            batch.append(q.popleft())
        sum_ctx_plus_1 = DECODE_TOKEN_CAP - budget
        ms = decode_stage_ms(spec.coeffs, spec.pp, len(batch), sum_ctx_plus_1)
        if w.stage == 0:
            ms += ray_overhead_ms(sum_ctx_plus_1 - len(batch))
        w.busy = True
        self.num_iterations += 1
        self.loop.at(t + ms, self._end_decode, (w, batch))

    def _end_decode(self, t: float, arg: tuple) -> None:
        w, batch = arg
        if w.last:
            done, output, finish, kept = self.done, self.output, self.finish, []
            for rid in batch:
                done[rid] += 1
                if done[rid] >= output[rid]:
                    finish[rid] = t
                else:
                    kept.append(rid)
            batch = kept
        if batch:
            w.next.decode_q.extend(batch)
            if w.last:
                t = self._skip(t, w, batch)
            self._wake(t, w.next)
        w.busy = False
        self._step(t, w)

    def _skip(self, t: float, w: _Worker, batch: list[int]) -> float:
        """Run at once the iterations of a batch alone in its instance (the whole decode queue, every
        other stage idle) that no request exits in and that end before the next event: same times."""
        ring = [w.next]
        while ring[-1] is not w:
            ring.append(ring[-1].next)
        others = any(x.prefill_q or x.decode_q and x is not ring[0] or x.busy and x is not w for x in ring)
        if others or len(ring[0].decode_q) != len(batch):
            return t
        done, n, pp, horizon = self.done, len(batch), len(ring), self.loop.heap[0][0] if self.loop.heap else math.inf
        left = min(self.output[r] - done[r] for r in batch) - 1
        sum_ctx_plus_1, m = sum(self.prompt[r] + done[r] for r in batch) + n, 0
        while m < left and sum_ctx_plus_1 <= DECODE_TOKEN_CAP:
            stage = decode_stage_ms(w.spec.coeffs, pp, n, sum_ctx_plus_1)
            end = t + (stage + ray_overhead_ms(sum_ctx_plus_1 - n))
            for _ in range(pp - 1):  # added stage by stage, as the events would
                end += stage
            if end >= horizon:
                break
            t, sum_ctx_plus_1, m = end, sum_ctx_plus_1 + n, m + 1
        for r in batch:
            done[r] += m
        self.num_iterations += m * pp
        return t

    def result(self, slo: SLO) -> SimResult:
        arrival, first, finish = np.array(self.arrival), np.array(self.first), np.array(self.finish)
        output = np.array(self.output, dtype=np.float64)
        served = np.isfinite(finish)
        ttft = np.where(served, (first - arrival) * 1e-3, np.inf)
        tpot = np.where(served, (finish - first) * 1e-3 / np.maximum(output, 1), np.inf)
        makespan = float((finish[served].max() - arrival.min()) * 1e-3) if served.any() else 0.0
        return SimResult(ttft_s=ttft, tpot_s=tpot, slo=slo, makespan_s=makespan, num_output_tokens=int(output.sum()))


class DistServeSimulator:
    """A placement simulated with DistServe's semantics; `run` returns our `SimResult`. Disaggregated:
    `prefill.replicas` prefill and `decode.replicas` decode instances (DistServe's own runs use one of
    each); colocated: vLLM instances, simulated with the profile given (DistServe's vLLM profile)."""

    def __init__(self, *, placement: Placement, profile: Profile, model: ModelSpec, memory: MemoryModel) -> None:
        if placement.mode == "chunked":
            raise ValueError("--semantics distserve simulates disaggregated and colocated (vLLM) placements, not chunked")
        self.placement, pf, dc = placement, placement.prefill, placement.decode
        disagg = placement.mode == "disaggregated"
        self.prefills = [self._spec("prefill" if disagg else "both", profile, model, memory, pf.tp, pf.pp)] * pf.replicas
        self.decodes = [self._spec("decode", profile, model, memory, dc.tp, dc.pp)] * dc.replicas if disagg else []
        self.last_num_iterations = 0

    @staticmethod
    def _spec(role: str, profile: Profile, model: ModelSpec, memory: MemoryModel, tp: int, pp: int) -> InstanceSpec:
        if err := parallel_config_error(model, tp=tp, pp=pp):
            raise ValueError(f"{model.name}: {err}")
        if (tokens := memory.kv_capacity_tokens(tp, pp) or 0) <= 0:
            raise ValueError(f"{model.name} with tp={tp}, pp={pp} has no max_num_tokens entry (does not fit)")
        return InstanceSpec(role=role, coeffs=profile.coeffs(model.name, tp).without_tables(), pp=pp, max_num_tokens=tokens)

    def run(self, trace: Trace, *, slo: SLO, phase: Phase = "both") -> SimResult:
        if phase != "both":
            raise ValueError(f"--semantics distserve simulates whole systems only, got phase={phase!r}")
        run = _Run(self.prefills, self.decodes, trace)
        run.run()
        self.last_num_iterations = run.num_iterations  # prefill + decode iterations of all stages
        return run.result(slo)


def percentiles_pass(result: SimResult, target: float) -> bool:
    """DistServe's bisection test: P(100·target) TTFT < the TTFT SLO and P(100·target) TPOT < the
    TPOT SLO, each apart (an infinite SLO always passes; NaN TPOTs, single-phase runs, count as 0)."""
    q, big = 100.0 * target, 1e30  # unserved requests (inf) sort last without a NaN interpolation
    for values, slo in ((result.ttft_s, result.slo.ttft_s), (result.tpot_s, result.slo.tpot_s)):
        if math.isfinite(slo) and len(values) and not float(np.percentile(np.nan_to_num(values, nan=0.0, posinf=big), q)) < slo:
            return False
    return True


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SemanticsSearchContext(SearchContext):
    """`SearchContext` with a choice of simulator (semantics "distserve": `DistServeSimulator`, whole
    systems only; "dsjax": `Simulator`) and of pass rule (criterion "p90": `percentiles_pass` at the
    attainment target; "joint": ours, joint attainment of all and of the last half ≥ the target)."""

    semantics: str = "distserve"
    criterion: str = "p90"

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS or self.criterion not in CRITERIA:
            raise ValueError(f"semantics={self.semantics!r}, criterion={self.criterion!r}: expected {SEMANTICS}, {CRITERIA}")

    def simulator(self, placement: Placement, profile: Profile | None = None):  # type: ignore[override]
        if self.semantics == "dsjax":
            return super().simulator(placement, profile)
        return DistServeSimulator(placement=placement, profile=profile or self.profile, model=self.model, memory=self.memory)

    def passes(self, result: SimResult) -> bool:
        if self.criterion == "joint":
            return super().passes(result)
        return percentiles_pass(result, self.goodput_config.attainment_target)


def search_context(*, semantics: str = "dsjax", criterion: str | None = None, **fields: Any) -> SearchContext:
    """A `SemanticsSearchContext`, or a plain `SearchContext` for dsjax + joint (criterion None: p90
    with distserve, joint with dsjax)."""
    criterion = criterion or ("p90" if semantics == "distserve" else "joint")
    if semantics == "dsjax" and criterion == "joint":
        return SearchContext(**fields)
    return SemanticsSearchContext(semantics=semantics, criterion=criterion, **fields)


def grid_bisect(passes: Callable[[float], bool], *, high: float = 5.0, esp: float = 0.25) -> float:
    """DistServe's bisection of the per-GPU rate: midpoints of [0, high] until high − low ≤ esp; the
    last passing one, or 0. Its README's 1.56 is 1.5625: a true boundary in [1.5625, 1.71875)."""
    low, best = 0.0, 0.0
    while high - low > esp:
        mid = (low + high) / 2
        if passes(mid):
            low = best = mid
        else:
            high = mid
    return best


def placement_goodput(ctx: SearchContext, placement: Placement, *, grid: bool = True) -> dict[str, Any]:
    """Goodput of one placement (`simulate --goodput`): bisection to the context's rel_tol and, with
    `grid`, the value DistServe's own bisection would print (per GPU, 0.25 steps in [0, 5])."""
    g, n = ctx.goodput(placement), placement.num_devices
    out: dict[str, Any] = {"goodput": g, "per_device_goodput": g / n}
    if grid:
        sim = ctx.simulator(placement)

        def passes(per_gpu: float) -> bool:
            ctx._stats["simulations"] += 1
            return ctx.passes(sim.run(ctx.trace_at(per_gpu * n), slo=ctx.slo))

        out["per_device_goodput_grid"] = grid_bisect(passes)
    return out | {"semantics": getattr(ctx, "semantics", "dsjax"), "criterion": getattr(ctx, "criterion", "joint"),
                  "num_devices": n, "num_simulations": ctx.num_simulations}


def distserve_configs(ctx: SearchContext, cluster: ClusterSpec, *, affinity: str = "high") -> list[Placement]:
    """The 1:1 pairs DistServe's search tries (`get_distserve_configs`) less those it fails on (no
    profile TP, no max_num_tokens row). high: TP, PP ≤ GPUs, tp_p·pp_p + tp_d·pp_d ≤ GPUs; low: TP, PP
    and the pair's segment within a node, repeated over P nodes as pipeline stages (PP × P)."""
    if affinity not in ("high", "low"):
        raise ValueError(f"affinity={affinity!r} must be 'high' or 'low'")
    model, total, per_node = ctx.model, cluster.num_gpus, cluster.gpus_per_node
    limit = total if affinity == "high" else per_node
    layer_divs = [d for d in range(1, model.num_layers + 1) if model.num_layers % d == 0]
    tps = [t for t in range(1, limit + 1) if model.num_heads % t == 0 and t <= limit and ctx.profile.has(model.name, t)]
    pps = [p for p in layer_divs if p <= limit]
    crosses = [1] if affinity == "high" else [p for p in layer_divs if p <= cluster.num_nodes]

    def fits(tp: int, pp: int) -> bool:
        return parallel_config_error(model, tp=tp, pp=pp) is None and (ctx.memory.kv_capacity_tokens(tp, pp) or 0) > 0

    out = []
    for cross, tp_p, pp_p, tp_d, pp_d in itertools.product(crosses, tps, pps, tps, pps):
        segment = tp_p * pp_p + tp_d * pp_d
        if (affinity == "low" and segment > per_node) or cross * segment > total:
            continue
        pre, dec = (tp_p, cross * pp_p), (tp_d, cross * pp_d)
        if pre[1] in layer_divs and dec[1] in layer_divs and fits(*pre) and fits(*dec):
            out.append(Placement(prefill=PhaseParallel(tp=pre[0], pp=pre[1]), decode=PhaseParallel(tp=dec[0], pp=dec[1])))
    return out


def search_pairs(ctx: SearchContext, cluster: ClusterSpec, *, affinity: str = "high", progress: bool = False) -> Plan:
    """DistServe's placement search: every 1:1 pair simulated whole, the best goodput per GPU wins
    (ties: fewer GPUs). With a `SemanticsSearchContext` this is the public code's search, with
    bisection on the rate to `rel_tol` instead of its 0.25 req/s/GPU steps."""
    from dsjax.planner.algorithms import Plan, _Progress

    configs = distserve_configs(ctx, cluster, affinity=affinity)
    if not configs:
        raise ValueError(f"no prefill/decode pair of {ctx.model.name} fits in {cluster.num_gpus} GPUs")
    bar = _Progress(progress, "pairs", len(configs))
    best: Plan | None = None
    table = []
    try:
        for placement in configs:
            g = ctx.goodput(placement)
            bar.update()
            n = placement.num_devices
            table.append({"placement": placement.to_dict(), "goodput": g, "per_device": g / n})
            if best is None or g / n > best.per_device_goodput * (1 + 1e-9) or (
                g / n >= best.per_device_goodput * (1 - 1e-9) and n < best.placement.num_devices
            ):
                best = Plan(placement=placement, goodput=g, per_device_goodput=g / n, algorithm=f"pairs-{affinity}")
    finally:
        bar.close()
    assert best is not None
    return dataclasses.replace(best, details={"table": table, "unit": "pair", "copies": 1})
