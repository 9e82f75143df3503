"""Discrete-event simulation of a cluster (a `Placement`) serving a trace.

    sim = Simulator(placement=Placement(...), profile=load_profile(...), model=get_model("opt-13b"),
                    memory=MemoryModel(...))
    result = sim.run(trace, slo=SLO(ttft_s=0.2, tpot_s=0.1))        # -> SimResult
    result.attainment, result.summary()

Modes (placement.mode):
- disaggregated: `prefill.replicas` prefill instances and `decode.replicas` decode instances. A new
  request goes to the prefill instance with the least queued prompt tokens; once prefilled (first
  token) it is assigned to the least loaded decode instance, which pulls its KV when the pull rule
  allows (transfer time = KV bytes / link bandwidth when a bandwidth is given).
- colocated / chunked: `prefill.replicas` identical instances each running both phases.

`run(..., phase="prefill")` simulates the prefill instances alone and judges TTFT only (a request
finishes at its first token); `phase="decode"` simulates the decode instances alone, requests
arriving already prefilled, and judges TPOT only. Algorithm 1 uses these.

Speed: one event per prefill batch and one per decode-batch membership change, not per token.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Literal

from dsjax.engine.placement import Placement
from dsjax.engine.policies import least_loaded
from dsjax.planner.events import EventLoop, RequestTable
from dsjax.planner.colocated_instance import SimColocatedInstance
from dsjax.planner.instances import SimDecodeInstance, SimPrefillInstance
from dsjax.planner.latency import LatencyModel, Profile
from dsjax.planner.model_spec import MemoryModel, ModelSpec, parallel_config_error
from dsjax.planner.slo import SLO, SimResult
from dsjax.workloads.trace_gen import Trace

Phase = Literal["both", "prefill", "decode"]
UNLIMITED_TOKENS = 1 << 62


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Knobs of the online schedulers (shared by every instance of a run)."""

    prefill_token_budget: int | None = None  # L_m; None: latency.saturating_prefill_tokens(0.9)
    prefill_max_batch_size: int = 256
    decode_max_batch_size: int = 256
    pull_waiting_fraction: float = 0.05
    colocated_token_budget: int = 2048  # vLLM's max_num_batched_tokens for 2048-token models
    chunk_tokens: int = 512  # chunked prefill: tokens per step (decodes + prefill chunks)
    # chunked prefill: one forward pass per mixed step (Sarathi), or the decode program and the
    # prefill program back to back (dsjax's engine on the XLA path; dsjax/engine/colocated.py)
    chunked_fused_steps: bool = True
    link_bytes_per_s: float | None = None  # KV transfer bandwidth; None: transfers are free
    # Fixed latency of one KV transfer on top of bytes / link_bytes_per_s (a pull's round trips,
    # landing the KV in the decode pool): measured per request on a served run (dsjax.bench).
    transfer_fixed_s: float = 0.0
    # Decode-instance time per request joining its batch, before the next step (dsjax's decode
    # worker lands pulled KV into its pool between steps, ~5 ms a request on one CPU core; fitted
    # on step logs by planner/served.py). 0: joining is free (DistServe's simulator).
    decode_join_s: float = 0.0
    # Host time before every decode step that continues running requests (and every mixed step
    # with decodes): the engine's, which an emulated run measures (InstanceStats.host_gap_seconds
    # / continued_steps, dsjax/runtime/emulated.py). 0: the device never waits for its host.
    decode_host_s: float = 0.0
    # Host time before every prompt batch (a prefill, or a mixed step without such decodes), from
    # when it could have started: measured the same way (prefill_host_gap_seconds / prefill_launches).
    prefill_host_s: float = 0.0
    pp_overhead_ms: float = 1.0
    # KV blocks (tokens): a decode instance pulls a request only with one block of growth to spare
    # per request it runs (the engine's DecodeInstance.can_pull, --block-size)
    kv_block_size: int = 16
    # False: KV capacity never limits batching (DistServe's public simulator does not model it);
    # whether the weights fit is still checked.
    kv_capacity_limit: bool = True
    # Cost batches at the engine's padded shapes when the profile records them (our profiler's do;
    # DistServe's do not, so this changes nothing for them).
    shape_buckets: bool = True
    # The router's cap on Prefill calls a prefill instance holds at once (serving/remote.py,
    # --max-prefill-inflight; the emulated servers run with 64): past it requests wait in the
    # router, first come first served, for the next freed slot. None: no cap (requests go to an
    # instance on arrival; the planner's and DistServe's model).
    prefill_max_inflight: int | None = None

    def __post_init__(self) -> None:
        if self.prefill_token_budget is not None and self.prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget={self.prefill_token_budget} must be >= 1")
        if self.prefill_max_inflight is not None and self.prefill_max_inflight < 1:
            raise ValueError(f"prefill_max_inflight={self.prefill_max_inflight} must be >= 1 (or None for no cap)")
        for name in ("prefill_max_batch_size", "decode_max_batch_size", "colocated_token_budget", "chunk_tokens",
                     "kv_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.pull_waiting_fraction <= 1:
            raise ValueError(f"pull_waiting_fraction={self.pull_waiting_fraction} must be in (0, 1]")
        for name in ("transfer_fixed_s", "decode_join_s", "decode_host_s", "prefill_host_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.link_bytes_per_s is not None and self.link_bytes_per_s <= 0:
            raise ValueError(f"link_bytes_per_s={self.link_bytes_per_s} must be > 0 (or None for free transfers)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PhaseSetup:
    latency: LatencyModel
    capacity_tokens: int
    replicas: int


class Simulator:
    """A validated cluster description that can run many traces (the search reuses one per config)."""

    def __init__(
        self,
        *,
        placement: Placement,
        profile: Profile,
        model: ModelSpec,
        memory: MemoryModel,
        config: SimConfig = SimConfig(),
    ) -> None:
        self.placement = placement
        self.model = model
        self.config = config
        self.prefill = self._setup(profile, memory, placement.prefill.tp, placement.prefill.pp, placement.prefill.replicas)
        self.decode = (
            self._setup(profile, memory, placement.decode.tp, placement.decode.pp, placement.decode.replicas)
            if placement.mode == "disaggregated"
            else self.prefill
        )
        budget = config.prefill_token_budget
        self.prefill_token_budget = budget if budget is not None else self.prefill.latency.saturating_prefill_tokens(0.9)

    def _setup(self, profile: Profile, memory: MemoryModel, tp: int, pp: int, replicas: int) -> _PhaseSetup:
        err = parallel_config_error(self.model, tp=tp, pp=pp)
        if err:
            raise ValueError(f"{self.model.name}: {err}")
        capacity = memory.kv_capacity_tokens(tp, pp)
        if capacity is None or capacity <= 0:
            raise ValueError(f"{self.model.name} with tp={tp}, pp={pp} does not fit in {memory.device.name} memory")
        latency = profile.latency(
            self.model.name, tp=tp, pp=pp, pp_overhead_ms=self.config.pp_overhead_ms, use_buckets=self.config.shape_buckets
        )
        if not self.config.kv_capacity_limit:
            capacity = UNLIMITED_TOKENS
        return _PhaseSetup(latency=latency, capacity_tokens=capacity, replicas=replicas)

    def run(self, trace: Trace, *, slo: SLO, phase: Phase = "both") -> SimResult:
        if phase not in ("both", "prefill", "decode"):
            raise ValueError(f"phase={phase!r} must be 'both', 'prefill' or 'decode'")
        if self.placement.mode != "disaggregated" and phase != "both":
            raise ValueError(f"phase={phase!r} needs a disaggregated placement, got mode={self.placement.mode!r}")
        loop = EventLoop()
        reqs = RequestTable(trace)
        if self.placement.mode == "disaggregated":
            submit = self._build_disaggregated(loop, reqs, phase)
        else:
            submit = self._build_colocated(loop, reqs)
        for rid, t in enumerate(reqs.arrival):
            loop.at(t, submit, rid)
        loop.run()
        if phase == "prefill":
            slo = SLO(ttft_s=slo.ttft_s)
        elif phase == "decode":
            slo = SLO(tpot_s=slo.tpot_s)
        return SimResult.from_times(**reqs.arrays(), slo=slo)

    def _build_disaggregated(self, loop: EventLoop, reqs: RequestTable, phase: Phase):
        cfg = self.config
        per_token = 0.0
        if cfg.link_bytes_per_s is not None:
            per_token = self.model.kv_bytes_per_token / cfg.link_bytes_per_s
        decodes = [
            SimDecodeInstance(
                loop, reqs, self.decode.latency,
                capacity_tokens=self.decode.capacity_tokens,
                max_batch_size=cfg.decode_max_batch_size,
                waiting_fraction=cfg.pull_waiting_fraction,
                transfer_s_per_token=per_token,
                transfer_fixed_s=cfg.transfer_fixed_s,
                join_s=cfg.decode_join_s,
                host_s=cfg.decode_host_s,
                block_size=cfg.kv_block_size,
                on_preempted=lambda t, rid: recompute(t, rid),
            )
            for _ in range(self.decode.replicas)
        ]

        def to_decode(t: float, rid: int, src: SimPrefillInstance | None) -> None:
            target = decodes[least_loaded([d.load() for d in decodes])] if len(decodes) > 1 else decodes[0]
            target.assign(t, rid, src)

        if phase == "decode":
            def submit_decode(t: float, rid: int) -> None:
                reqs.first[rid] = t
                if reqs.output[rid] == 1:
                    reqs.finish[rid] = t
                    return
                to_decode(t, rid, None)

            def recompute(t: float, rid: int) -> None:
                # No prefill instances here: a preempted request's recompute costs nothing, and it
                # is pulled again after the requests already waiting (the next event, not now).
                reqs.done[rid] += 1
                reqs.plen[rid] += 1
                if reqs.done[rid] + 1 >= reqs.output[rid]:
                    reqs.finish[rid] = t
                else:
                    loop.at(t, lambda t2, r: to_decode(t2, r, None), rid)
            return submit_decode

        def prefilled(t: float, rid: int, src: SimPrefillInstance) -> None:
            if slots is not None:
                slots.release(t, rid)
            if phase == "prefill" or reqs.done[rid] + 1 >= reqs.output[rid]:
                reqs.finish[rid] = t
                src.release(t, reqs.plen[rid])
                return
            to_decode(t, rid, src)

        prefills = [
            SimPrefillInstance(
                loop, reqs, self.prefill.latency,
                capacity_tokens=self.prefill.capacity_tokens,
                token_budget=self.prefill_token_budget,
                max_batch_size=cfg.prefill_max_batch_size,
                on_prefilled=prefilled,
                host_s=cfg.prefill_host_s,
            )
            for _ in range(self.prefill.replicas)
        ]

        def recompute(t: float, rid: int) -> None:
            # the engine's DisaggEngine.requeue: the front of the queue with the fewest prompt tokens
            prefills[least_loaded([p.queued_tokens for p in prefills]) if len(prefills) > 1 else 0].submit(t, rid, front=True)

        slots = None if cfg.prefill_max_inflight is None else _PrefillSlots(prefills, cfg.prefill_max_inflight)
        if slots is not None:
            return slots.submit
        if len(prefills) == 1:
            return lambda t, rid: prefills[0].submit(t, rid)
        return lambda t, rid: prefills[least_loaded([p.load() for p in prefills])].submit(t, rid)

    def _build_colocated(self, loop: EventLoop, reqs: RequestTable):
        cfg = self.config
        instances = [
            SimColocatedInstance(
                loop, reqs, self.prefill.latency,
                capacity_tokens=self.prefill.capacity_tokens,
                max_batch_size=cfg.decode_max_batch_size,
                prefill_token_budget=cfg.colocated_token_budget,
                chunked=self.placement.mode == "chunked",
                chunk_tokens=cfg.chunk_tokens,
                fused_mixed_steps=cfg.chunked_fused_steps,
                prefill_max_batch_size=cfg.prefill_max_batch_size,
                host_s=cfg.decode_host_s,
                prefill_host_s=cfg.prefill_host_s,
            )
            for _ in range(self.prefill.replicas)
        ]
        if len(instances) == 1:
            return lambda t, rid: instances[0].submit(t, rid)
        return lambda t, rid: instances[least_loaded([c.load() for c in instances])].submit(t, rid)


def simulate(
    trace: Trace,
    *,
    placement: Placement,
    profile: Profile,
    model: ModelSpec,
    memory: MemoryModel,
    slo: SLO,
    config: SimConfig = SimConfig(),
    phase: Phase = "both",
) -> SimResult:
    """One-shot convenience wrapper around `Simulator(...).run(...)`."""
    sim = Simulator(placement=placement, profile=profile, model=model, memory=memory, config=config)
    return sim.run(trace, slo=slo, phase=phase)


def md1_mean_ttft(service_s: float, rate: float) -> float:
    """M/D/1 mean sojourn time D + R D^2 / (2 (1 - R D)) (paper section 3.1); inf when R D >= 1."""
    rho = rate * service_s
    return math.inf if rho >= 1 else service_s + rate * service_s * service_s / (2.0 * (1.0 - rho))


class _PrefillSlots:
    """The router's Prefill slots (serving/remote.py, RemoteBackend.slot): a prefill instance holds
    at most `cap` requests, from dispatch until their first token; while every instance is full,
    new requests wait here, first come first served, and each freed slot goes to the first waiter,
    on the least loaded instance with room (the registry's choice, as without a cap)."""

    def __init__(self, prefills: list[SimPrefillInstance], cap: int):
        self.prefills = prefills
        self.cap = cap
        self.held = [0] * len(prefills)
        self.on: dict[int, int] = {}  # request -> the instance holding its slot
        self.waiting: collections.deque[int] = collections.deque()

    def submit(self, t: float, rid: int) -> None:
        if self.waiting or not self._dispatch(t, rid):
            self.waiting.append(rid)

    def release(self, t: float, rid: int) -> None:
        i = self.on.pop(rid, None)
        if i is None:  # a recomputed request: requeued on an instance directly, as the engine does
            return
        self.held[i] -= 1
        while self.waiting and self._dispatch(t, self.waiting[0]):
            self.waiting.popleft()

    def _dispatch(self, t: float, rid: int) -> bool:
        room = [i for i in range(len(self.prefills)) if self.held[i] < self.cap]
        if not room:
            return False
        i = room[least_loaded([self.prefills[j].load() for j in room])]
        self.held[i] += 1
        self.on[rid] = i
        self.prefills[i].submit(t, rid)
        return True
