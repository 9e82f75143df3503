"""The one place a model and its runners are built: every entry point (the offline `LLM`, the
in-process server, a worker process, the profiler and the micro-benchmarks) calls these.

- `load_causal_lm`: a preset or an HF checkpoint folder -> (the Flax module, its weights as a
  `WeightSource`: nothing is read until a runner places each stage's share on its devices);
- `platform_backend`: the attention path a model takes on this platform when none is asked for;
- `build_runner`: one instance of a phase's (tp, pp) on devices (or unsharded, on the default
  device, with no phase);
- `build_engine`: the engine for a placement and a mode:
  - disaggregated: `placement.prefill.replicas` prefill instances and `placement.decode.replicas`
    decode instances, each on its own devices (dsjax/engine/disaggregated.py);
  - colocated / chunked: `placement.prefill.replicas` independent instances doing both phases
    (dsjax/engine/colocated.py).
  With no placement the model runs unsharded on the default device (colocated).

Weights (docs/weights.md, "Sharded loading"): every runner built from a `WeightSource` loads each
of its stages' weights tensor by tensor from the checkpoint file (memory-mapped) or the random
init straight onto the stage's mesh with the phase's sharding, so no device ever holds the whole
model and nothing unsharded outlives start-up. A params tree already in memory is still accepted
(resharded with device_put), for tests and callers that made one.
"""

from __future__ import annotations

from typing import Sequence

import jax

from dsjax.engine.colocated import ColocatedEngine, ReplicatedEngine
from dsjax.engine.disaggregated import DecodeInstance, DisaggEngine, PrefillInstance
from dsjax.engine.placement import MODES, PhaseParallel, Placement
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.runner import ModelRunner
from dsjax.runtime.sharding import ShardingRules, carve, instance_meshes
from models.attention import BACKENDS, default_backend
from models.transformer import CausalLM
from models.weights import DTYPES, WeightSource, open_weights


def load_causal_lm(model: str, *, dtype: str = "float32", dummy_weights: bool = False, seed: int = 0,
                   backend: str | None = None) -> tuple[CausalLM, WeightSource]:
    """The Flax module and its weights, not yet read (a `WeightSource`: `build_runner` and
    `build_engine` place them), for a preset name or a checkpoint folder; `dtype` names the
    compute and weight dtype, `backend` the attention path: "xla", "pallas", "auto" (chosen per
    program shape, models.attention.attend) or None, the platform's path for the model, fixed for
    every shape (`platform_backend`; servers use it for --attention-backend auto)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} must be one of {BACKENDS}")
    weights = open_weights(model, dtype=DTYPES[dtype], dummy_weights=dummy_weights, seed=seed)
    config = weights.config
    return CausalLM(config=config, dtype=DTYPES[dtype], backend=backend or platform_backend(config)), weights


def platform_backend(config) -> str:
    """The attention path a model takes on this platform when none is asked for: the Pallas kernels
    on GPU (models.attention.default_backend), the XLA path elsewhere, and for a model with a
    sliding window, which the kernels do not implement. One path for every program shape, unlike
    the models' "auto", which on CPU also runs the ragged kernel, interpreted, for large prefills."""
    if getattr(config, "sliding_window", None) is not None:  # ModelConfig.sliding_window (Mistral)
        return "xla"
    return default_backend()


def build_runner(model: CausalLM, params: WeightSource | dict, cache: CacheConfig, *, phase: PhaseParallel | None = None,
                 devices: Sequence | None = None, rules: ShardingRules | None = None) -> ModelRunner:
    """One instance: with `phase`, its tp * pp devices taken in order from `devices` (default all
    local devices) as pp stage meshes of tp devices; with none, unsharded on the default device.
    `params`: a `WeightSource` (each stage reads its weights straight onto its mesh) or a tree."""
    if phase is None:
        return ModelRunner(model, params, cache)
    devices = list(jax.devices() if devices is None else devices)
    need = phase.devices_per_instance
    if need > len(devices):
        raise ValueError(
            f"tp={phase.tp} x pp={phase.pp} needs {need} devices, only {len(devices)} visible; on a CPU run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need} (set before jax is imported)"
        )
    return ModelRunner(model, params, cache, instance_meshes(devices[:need], phase).meshes, rules)


def _colocated(runner: ModelRunner, scheduler: SchedulerConfig, chunked: bool) -> ColocatedEngine:
    # A chunked engine prefills chunks after cached prefixes: its prefill programs always read the
    # cache, so one program variant per shape serves its fresh and its continued chunks alike.
    runner.fresh_prefill = not chunked
    return ColocatedEngine(runner, scheduler, chunked=chunked)


def build_engine(model: CausalLM, params: WeightSource | dict, *, placement: Placement | None, mode: str, cache: CacheConfig,
                 scheduler: SchedulerConfig, devices: list | None = None, prefill_rules: ShardingRules | None = None,
                 decode_rules: ShardingRules | None = None):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    chunked = mode == "chunked"
    if placement is None:
        if mode == "disaggregated":
            raise ValueError("mode='disaggregated' needs a placement (which devices prefill and decode use)")
        return _colocated(build_runner(model, params, cache), scheduler, chunked)
    if placement.mode != mode:
        placement = Placement(prefill=placement.prefill, decode=placement.decode if mode == "disaggregated" else placement.prefill, mode=mode)
    meshes = carve(placement, devices)

    def runners(name: str, rules: ShardingRules | None) -> list[ModelRunner]:
        return [ModelRunner(model, params, cache, inst.meshes, rules) for inst in meshes[name]]

    if mode == "disaggregated":
        return DisaggEngine([PrefillInstance(r, scheduler) for r in runners("prefill", prefill_rules)],
                            [DecodeInstance(r, scheduler) for r in runners("decode", decode_rules)])
    engines = [_colocated(r, scheduler, chunked) for r in runners("colocated", prefill_rules)]
    return engines[0] if len(engines) == 1 else ReplicatedEngine(engines)
