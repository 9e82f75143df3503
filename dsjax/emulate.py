"""Emulated devices for paper-scale runs through the real control plane (issue #17).

    python -m dsjax.serve --emulate /work/shared/reference/distserve-a100/profiler-a100-80g.distserve.json \\
        --model opt-13b --prefill-tp 2 --decode-replicas 2 [--workers processes] [--emulate-link-gbps 200]

Every instance of the placement runs on `EmulatedRunner`s (dsjax/runtime/emulated.py): its prefill
and decode calls sleep for the time the latency profile gives for that batch at the instance's TP
and PP (the planner's `LatencyModel`, the same the simulator uses), its KV pool is sized from the
model's bytes on emulated A100-80GB devices, and KV transfers move a placeholder while counting the
real bytes, taking bytes / --emulate-link-gbps. The router, the worker processes, the scheduler,
the block manager, leases and gRPC are the real code. No jax is loaded and no weights are read.

`--emulate-time-scale K` runs the cluster in slow motion: every step and transfer takes K x its
modelled time, while the host's own time per step (Python, gRPC, the GIL) does not stretch. A
client that sends K x slower and divides what it measures by K then sees the cluster as a host K x
faster would drive it: how a 2-core machine measures 32 emulated devices whose token rate it
cannot keep up with at full speed (`python -m dsjax.bench compare --time-scale K`).

The profile: DistServe's schema (`dsjax.plan profile` writes the same), keyed by model name and TP
degree; a TP the profile lacks is refused. The model: a preset (opt-13b, opt-66b, ...) or a
checkpoint folder's config.json, for its byte counts. The dtype of those bytes: --dtype, else the
profile's metadata "dtype", else float16 (DistServe's profiles are fp16).

This module is the glue between the planner (profiles) and the runtime (runners); the serving
launcher takes the `Emulation` it builds as an opaque runner factory.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging

from dsjax.engine.colocated import ColocatedEngine, ReplicatedEngine
from dsjax.engine.disaggregated import DecodeInstance, DisaggEngine, PrefillInstance
from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.planner.latency import LatencyModel, Profile, load_profile
from dsjax.runtime.emulated import (
    A100_80G_BYTES,
    GIB,
    GPU_MEMORY_UTILIZATION,
    EmulatedRunner,
    SlowMotion,
    StepCost,
    emulated_cache,
)
from dsjax.runtime.kv_cache import CacheConfig
from models.config import ModelConfig

log = logging.getLogger("dsjax.emulate")
DEFAULT_DTYPE = "float16"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The --emulate flags of `python -m dsjax.serve`."""
    g = p.add_argument_group("emulated devices (dsjax/emulate.py)")
    g.add_argument("--emulate", metavar="PROFILE", default=None,
                   help="serve on emulated devices: every prefill/decode call sleeps the time this latency profile "
                        "(DistServe's JSON schema, or what `python -m dsjax.plan profile` writes) gives for its batch; "
                        "KV pools and transfers keep the model's real byte counts; no jax, no weights")
    g.add_argument("--emulate-devices", type=int, default=None,
                   help="emulated devices in the cluster (default: as many as the placement uses)")
    g.add_argument("--emulate-memory-gib", type=float, default=A100_80G_BYTES / GIB, help="memory of one emulated device")
    g.add_argument("--emulate-utilization", type=float, default=GPU_MEMORY_UTILIZATION,
                   help="fraction of that memory for weights + KV (the planner's MemoryModel)")
    g.add_argument("--emulate-link-gbps", type=float, default=None,
                   help="KV transfer bandwidth in Gbit/s: a transfer takes the real KV bytes / this (default: free, "
                        "as `dsjax.plan --link-gbps`)")
    g.add_argument("--emulate-time-scale", type=float, default=1.0, metavar="K",
                   help="slow motion: every emulated step and transfer takes K x its modelled time, so a host too "
                        "small for the cluster drives it at 1/K of its speed (a client then sends K x slower and "
                        "divides what it measures by K: `dsjax.bench compare --time-scale`)")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Emulation:
    profile_path: str
    profile: Profile
    model: str  # as given (a preset name or a checkpoint folder)
    config: ModelConfig
    dtype: str
    num_devices: int | None = None
    memory_bytes: float = A100_80G_BYTES
    utilization: float = GPU_MEMORY_UTILIZATION
    link_bytes_per_s: float | None = None
    pp_overhead_ms: float = 1.0
    time_scale: float = 1.0  # slow motion (runtime/emulated.py SlowMotion): device time x this

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(DTYPE_BYTES)}")
        if self.num_devices is not None and self.num_devices < 1:
            raise ValueError(f"--emulate-devices={self.num_devices} must be >= 1")
        if self.memory_bytes <= 0 or not 0 < self.utilization <= 1:
            raise ValueError(f"memory {self.memory_bytes} B must be > 0 and utilization {self.utilization} in (0, 1]")
        if self.link_bytes_per_s is not None and self.link_bytes_per_s <= 0:
            raise ValueError(f"link bandwidth {self.link_bytes_per_s} B/s must be > 0")
        if not self.time_scale > 0:
            raise ValueError(f"--emulate-time-scale={self.time_scale} must be > 0")
        self.profile.tp_degrees(self.model_key)  # the profile must know the model

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Emulation":
        from serving.validation import model_config

        profile = load_profile(args.emulate)
        gbps = args.emulate_link_gbps
        return cls(profile_path=args.emulate, profile=profile, model=args.model, config=model_config(args.model),
                   dtype=args.dtype or str(profile.metadata.get("dtype") or DEFAULT_DTYPE), num_devices=args.emulate_devices,
                   memory_bytes=args.emulate_memory_gib * GIB, utilization=args.emulate_utilization,
                   link_bytes_per_s=None if gbps is None else gbps * 1e9 / 8, time_scale=args.emulate_time_scale)

    @property
    def model_key(self) -> str:
        """The name the profile knows the model by (a checkpoint's config name, else as given)."""
        for name in (self.model, self.config.name):
            try:
                self.profile.tp_degrees(name)
                return name
            except ValueError:
                pass
        return self.model

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def worker_argv(self) -> list[str]:
        """The flags that make a worker process emulate the same devices."""
        argv = ["--emulate", self.profile_path, "--emulate-memory-gib", repr(self.memory_bytes / GIB),
                "--emulate-utilization", repr(self.utilization)]
        if self.link_bytes_per_s is not None:
            argv += ["--emulate-link-gbps", repr(self.link_bytes_per_s * 8 / 1e9)]
        if self.time_scale != 1:
            argv += ["--emulate-time-scale", repr(self.time_scale)]
        return argv

    # ---- one instance --------------------------------------------------------------------------------
    def latency(self, tp: int, pp: int) -> LatencyModel:
        """The profile's model of one (tp, pp) instance, at full speed."""
        return self.profile.latency(self.model_key, tp=tp, pp=pp, pp_overhead_ms=self.pp_overhead_ms)

    def cost(self, tp: int, pp: int) -> StepCost:
        """What the instance's runner sleeps: the latency model, in slow motion when time_scale != 1."""
        lat = self.latency(tp, pp)
        return lat if self.time_scale == 1 else SlowMotion(lat, self.time_scale)

    @property
    def runner_link_bytes_per_s(self) -> float | None:
        """The link as the runners see it: in slow motion a transfer stretches as a step does."""
        return None if self.link_bytes_per_s is None else self.link_bytes_per_s / self.time_scale

    def cache(self, phase: PhaseParallel, *, block_size: int, num_blocks: int | None = None) -> CacheConfig:
        return emulated_cache(self.config, tp=phase.tp, pp=phase.pp, block_size=block_size, dtype_bytes=self.dtype_bytes,
                              num_blocks=num_blocks, memory_bytes=self.memory_bytes, utilization=self.utilization)

    def runner(self, phase: PhaseParallel, *, block_size: int, num_blocks: int | None = None,
               devices: list[int] | None = None) -> EmulatedRunner:
        """One (tp, pp) instance; ValueError when the profile lacks its TP or its weights do not fit."""
        return EmulatedRunner(self.config, self.cache(phase, block_size=block_size, num_blocks=num_blocks),
                              self.cost(phase.tp, phase.pp), tp=phase.tp, pp=phase.pp, dtype=self.dtype,
                              link_bytes_per_s=self.runner_link_bytes_per_s, devices=devices)

    # ---- a placement ---------------------------------------------------------------------------------
    def check(self, placement: Placement) -> Placement:
        """The placement on this emulated cluster, or SystemExit saying what to change."""
        phases = [placement.prefill] + ([placement.decode] if placement.mode == "disaggregated" else [])
        have = self.num_devices or placement.num_devices
        if placement.num_devices > have:
            raise SystemExit(f"mode {placement.mode} needs {placement.num_devices} devices and --emulate-devices is {have}")
        for phase in phases:
            if not self.profile.has(self.model_key, phase.tp):
                raise SystemExit(f"profile {self.profile_path} has no tp={phase.tp} for {self.model_key!r}; it has tp in "
                                 f"{list(self.profile.tp_degrees(self.model_key))}")
            try:
                self.cache(phase, block_size=16)
            except ValueError as e:
                raise SystemExit(str(e)) from None
        if placement.num_devices < have:
            log.info("%d of %d emulated devices unused by %s", have - placement.num_devices, have, placement.to_dict())
        return placement

    def build_engine(self, placement: Placement, *, scheduler: SchedulerConfig, block_size: int,
                     num_blocks: int | None = None):
        """What dsjax.runtime.builder.build_engine builds, on emulated devices: device ids are
        taken in order (or the placement's own), as `carve` takes jax's."""
        placement = self.check(placement)
        cursor = itertools.count()

        def runners(phase: PhaseParallel) -> list[EmulatedRunner]:
            out = []
            for r in range(phase.replicas):
                ids = list(phase.devices[r]) if phase.devices else [next(cursor) for _ in range(phase.tp * phase.pp)]
                out.append(self.runner(phase, block_size=block_size, num_blocks=num_blocks, devices=ids))
            return out

        if placement.mode == "disaggregated":
            return DisaggEngine([PrefillInstance(r, scheduler) for r in runners(placement.prefill)],
                                [DecodeInstance(r, scheduler) for r in runners(placement.decode)])
        engines = [ColocatedEngine(r, scheduler, chunked=placement.mode == "chunked") for r in runners(placement.prefill)]
        return engines[0] if len(engines) == 1 else ReplicatedEngine(engines)

    def describe(self, placement: Placement, block_size: int, num_blocks: int | None = None) -> str:
        phases = [("prefill", placement.prefill), ("decode", placement.decode)] if placement.mode == "disaggregated" \
            else [(placement.mode, placement.prefill)]
        parts = [f"{name} tp={p.tp} pp={p.pp} x{p.replicas}: {self.cache(p, block_size=block_size, num_blocks=num_blocks).num_blocks - 1} blocks"
                 for name, p in phases]
        link = "free" if self.link_bytes_per_s is None else f"{self.link_bytes_per_s * 8 / 1e9:g} Gbit/s"
        slow = "" if self.time_scale == 1 else f", in slow motion x{self.time_scale:g}"
        return (f"emulated {self.model} ({self.dtype}) on {self.memory_bytes / GIB:g} GiB devices, profile "
                f"{self.profile_path}, KV link {link}{slow}; " + "; ".join(parts))
