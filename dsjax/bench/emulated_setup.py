"""The emulated compare's cluster: the planner's placements for N emulated devices, the scheduler
limits the servers and the simulator share, and the server processes (dsjax/bench/emucompare.py).

    cluster = EmulatedCluster(profile_path=P, model="opt-66b", devices=32)
    plans = plan_systems(cluster, lengths, slos, systems)   # system -> SystemPlan (placement, simulated goodput)
    with launch_emulated("disaggregated", plans["disaggregated"].placement, cluster, log_dir) as launched:
        ...                                                   # launched.targets: the router's address

Placements (the planner, dsjax/planner, on the same profile, workload lengths, SLOs and scheduler
limits the servers run with):

- disaggregated: Algorithm 2 (low node-affinity, DistServe's testbed: 25 Gbit/s across nodes) or
  Algorithm 1 (`affinity="high"`) on ceil(N / gpus_per_node) nodes; its unit repeated to fill the
  cluster, so it may leave devices idle (per-device goodput counts the devices it uses).
- colocated / chunked: the planner's best single instance (TP, PP) by goodput per device
  (`best_colocated`), replicated N // (TP x PP) times.

Servers: one `python -m dsjax.serve --emulate PROFILE --plan PLAN --emulate-devices N` per system,
every instance on emulated devices (dsjax/emulate.py): no jax, no weights. In process by default
(`--workers inprocess`: the router and one thread per instance, which share one interpreter), or
every instance a worker process of its own (`--workers processes`: prefill and decode workers, or
colocated / chunked replica workers), as on a real cluster.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsjax.bench.servers import LaunchedSystem, ServerOptions, free_port
from dsjax.bench.simcompare import ENGINE_MAX_PREFILL_SEQS
from dsjax.engine.placement import Placement, save_plan
from dsjax.planner.latency import Profile, load_profile
from dsjax.planner.model_spec import DeviceSpec, MemoryModel, get_model
from dsjax.planner.simulator import SimConfig
from dsjax.planner.slo import SLO
from dsjax.workloads.trace_gen import TraceConfig, make_trace, resample

GIB = 1 << 30
AFFINITIES = ("low", "high")
# Colocated replicas priced by the cluster's baseline_profile: the paper's vLLM baseline.
BASELINE_SYSTEM = "vllm"
SYSTEM_MODE = {"disaggregated": "disaggregated", "colocated": "colocated", "chunked": "chunked", BASELINE_SYSTEM: "colocated"}
WORKERS = ("inprocess", "processes")
# Requests a router admits at once: every request of an overloaded run may be in flight (the
# default 256 refused some at 35 req/s of OPT-66B HumanEval on 24 devices).
MAX_PENDING = 4096

# DistServe's SLOs (OSDI Table 1) for the (model, workload) pairs the A100 profiles cover.
PAPER_SLOS: dict[tuple[str, str], tuple[float, float]] = {
    ("opt-13b", "sharegpt"): (0.25, 0.1),
    ("opt-66b", "sharegpt"): (2.5, 0.15),
    ("opt-66b", "humaneval"): (0.125, 0.2),
    ("opt-66b", "longbench"): (15.0, 0.15),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmulatedCluster:
    """N emulated devices priced by one latency profile, and the engine limits of every server."""

    profile_path: Path
    model: str
    devices: int
    gpus_per_node: int = 8
    affinity: str = "low"
    link_gbps: float | None = None  # KV transfers: real bytes / this (None: free, as DistServe's simulator)
    memory_gib: float = 80.0
    utilization: float = 0.92
    max_num_seqs: int = 256
    max_prefill_tokens: int = 1024
    block_size: int = 16
    # The "vllm" system's profile: colocated like "colocated", but priced by this profile (DistServe's
    # vLLM one: the paper's baseline, slower kernels than its own engine's); None: no such system.
    baseline_profile: Path | None = None
    workers: str = "inprocess"  # every system's instances: threads of the server, or worker processes
    # The router holds a stream's later tokens this long (serve --stream-interval-ms): fewer messages
    # through the router and client on a small host; TTFT and TPOT as measured do not change.
    stream_interval_ms: float = 0.0
    overlap_decode: bool = True  # serve --no-overlap-decode when False
    # Slow motion: the servers' devices take time_scale x their modelled time (serve
    # --emulate-time-scale) and the sweeps send and read back in the same units (SweepConfig.time_scale).
    # Everything of this cluster (the stream interval, the link) is given in the cluster's own time.
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.devices < 1 or self.gpus_per_node < 1:
            raise ValueError(f"devices={self.devices} and gpus_per_node={self.gpus_per_node} must be >= 1")
        if self.devices > self.gpus_per_node and self.devices % self.gpus_per_node:
            raise ValueError(f"devices={self.devices} must be a multiple of gpus_per_node={self.gpus_per_node}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale={self.time_scale} must be > 0")
        if self.affinity not in AFFINITIES or self.workers not in WORKERS:
            raise ValueError(f"affinity={self.affinity!r} must be in {AFFINITIES}, workers={self.workers!r} in {WORKERS}")

    @property
    def cluster(self):
        """The planner's ClusterSpec: ceil(N / gpus_per_node) nodes."""
        from dsjax.planner.algorithms import ClusterSpec

        per_node = min(self.devices, self.gpus_per_node)
        return ClusterSpec(num_nodes=math.ceil(self.devices / per_node), gpus_per_node=per_node)

    def profile_for(self, system: str) -> Path:
        if system == BASELINE_SYSTEM:
            if self.baseline_profile is None:
                raise ValueError(f"system {BASELINE_SYSTEM!r} needs a baseline profile (--baseline-profile)")
            return Path(self.baseline_profile)
        return Path(self.profile_path)

    def memory(self) -> MemoryModel:
        """What an emulated instance's KV pool holds (dsjax/runtime/emulated.py sizes it the same way)."""
        return MemoryModel(model=get_model(self.model), device=DeviceSpec(name="emulated", memory_bytes=self.memory_gib * GIB),
                           gpu_memory_utilization=self.utilization)

    def sim_config(self) -> SimConfig:
        """The servers' scheduler limits as the simulator knows them: L_m = --max-prefill-tokens
        (also the colocated prefill budget and the chunked step budget), <= 16 prompts a prefill
        batch (the engine's max_prefill_seqs), decode batches <= --max-num-seqs, fused mixed steps
        (the emulated runner's), KV pools of the emulated memory, the emulated link."""
        return SimConfig(
            prefill_token_budget=self.max_prefill_tokens, prefill_max_batch_size=ENGINE_MAX_PREFILL_SEQS,
            decode_max_batch_size=self.max_num_seqs, colocated_token_budget=self.max_prefill_tokens,
            chunk_tokens=self.max_prefill_tokens, chunked_fused_steps=True,
            link_bytes_per_s=None if self.link_gbps is None else self.link_gbps * 1e9 / 8,
        )

    def describe(self) -> dict[str, Any]:
        d = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        d["cluster"] = dataclasses.asdict(self.cluster)
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class SystemPlan:
    system: str
    placement: Placement
    planner_goodput: float  # the planner's simulated goodput of the placement (its own trace, req/s)
    details: dict[str, Any]

    @property
    def num_devices(self) -> int:
        return self.placement.num_devices


def search_context(cluster: EmulatedCluster, profile: Profile, lengths: Sequence[tuple[int, int]], slos, *,
                   seed: int = 0):
    """The planner's SearchContext: `lengths` (prompt, output) resampled to a unit-rate trace."""
    from dsjax.planner.search import GoodputConfig, SearchContext

    base = make_trace(list(lengths), TraceConfig(rate=1.0, seed=seed))
    gcfg = GoodputConfig(attainment_target=slos.target)
    return SearchContext(profile=profile, model=get_model(cluster.model), memory=cluster.memory(),
                         slo=SLO(ttft_s=slos.ttft_s, tpot_s=slos.tpot_s),
                         workload=resample(base, num_requests=gcfg.max_requests, seed=seed),
                         scheduler=cluster.sim_config(), goodput_config=gcfg)


def plan_systems(cluster: EmulatedCluster, lengths: Sequence[tuple[int, int]], slos, systems: Sequence[str], *,
                 seed: int = 0, progress: bool = False) -> dict[str, SystemPlan]:
    """The placement of every system on `cluster.devices` emulated devices (module docstring)."""
    from dsjax.planner.algorithms import algorithm1, algorithm2, best_colocated

    profile = load_profile(cluster.profile_path)
    ctx = search_context(cluster, profile, lengths, slos, seed=seed)
    plans = {}
    for system in systems:
        t0 = time.perf_counter()
        if system == "disaggregated":
            search = algorithm2 if cluster.affinity == "low" else algorithm1
            plan = search(ctx, cluster.cluster, progress=progress)
            placement, goodput = plan.placement, plan.goodput
            details = {"algorithm": plan.algorithm, "unit": plan.details.get("unit"), "copies": plan.details.get("copies"),
                       "per_device_goodput": plan.per_device_goodput}
        else:
            mode = SYSTEM_MODE[system]
            best = best_colocated(ctx, cluster.cluster, mode=mode, profile=load_profile(cluster.profile_for(system)),
                                  progress=progress)
            tp, pp = best.placement.prefill.tp, best.placement.prefill.pp
            replicas = cluster.devices // (tp * pp)
            placement = Placement.colocated(tp=tp, pp=pp, replicas=replicas, mode=mode)
            goodput = best.goodput * replicas
            details = {"algorithm": mode, "profile": str(cluster.profile_for(system)), "instance_goodput": best.goodput, "per_device_goodput": best.per_device_goodput,
                       "table": best.details.get("table")}
        details["search_s"] = time.perf_counter() - t0
        plans[system] = SystemPlan(system=system, placement=placement, planner_goodput=goodput, details=details)
    return plans


def describe_placement(p: Placement) -> str:
    if p.mode == "disaggregated":
        return (f"prefill tp{p.prefill.tp} pp{p.prefill.pp} x{p.prefill.replicas} + decode tp{p.decode.tp} "
                f"pp{p.decode.pp} x{p.decode.replicas} ({p.num_devices} devices)")
    return f"{p.mode} tp{p.prefill.tp} pp{p.prefill.pp} x{p.prefill.replicas} ({p.num_devices} devices)"


def server_argv(system: str, placement: Placement, cluster: EmulatedCluster, plan_path: Path, port: int) -> list[str]:
    """`python -m dsjax.serve` flags of one system on the emulated cluster."""
    workers = cluster.workers
    argv = ["--emulate", str(cluster.profile_for(system)), "--model", cluster.model, "--plan", str(plan_path),
            "--mode", placement.mode, "--workers", workers, "--emulate-devices", str(cluster.devices),
            "--emulate-memory-gib", repr(cluster.memory_gib), "--emulate-utilization", repr(cluster.utilization),
            "--port", str(port), "--host", "127.0.0.1", "--http-port", "0", "--metrics-port", "-1",
            "--max-num-seqs", str(cluster.max_num_seqs), "--max-prefill-tokens", str(cluster.max_prefill_tokens),
            "--block-size", str(cluster.block_size), "--max-pending", str(MAX_PENDING), "--log-level", "WARNING"]
    if cluster.link_gbps is not None:
        argv += ["--emulate-link-gbps", repr(cluster.link_gbps)]
    if cluster.stream_interval_ms:
        argv += ["--stream-interval-ms", repr(cluster.stream_interval_ms * cluster.time_scale)]
    if cluster.time_scale != 1:
        argv += ["--emulate-time-scale", repr(cluster.time_scale)]
    if not cluster.overlap_decode:
        argv.append("--no-overlap-decode")
    return argv


def launch_emulated(system: str, placement: Placement, cluster: EmulatedCluster, log_dir: str | Path, *,
                    ready_timeout_s: float = 120.0) -> LaunchedSystem:
    """Starts one emulated server for `system` and waits until it serves (its plan file and log
    in `log_dir`)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    plan_path = log_dir / f"plan-{system}.json"
    save_plan(plan_path, placement, emulated=True, model=cluster.model, devices=cluster.devices)
    port = free_port()
    launched = LaunchedSystem(system, num_devices=placement.num_devices)
    options = ServerOptions(model=cluster.model, pin=False, step_logs=False, warmup_shapes=False)
    launched.start_process("server", server_argv(system, placement, cluster, plan_path, port), core=None,
                           options=options, log_dir=log_dir)
    launched.targets = [f"127.0.0.1:{port}"]
    try:
        launched.wait_ready(ready_timeout_s)
    except BaseException:
        launched.stop()
        raise
    return launched
