"""Placement -> device meshes, and logical-axis sharding rules per phase.

Each instance is `pp` pipeline stages; each stage is a 1-D mesh of `tp` devices with axis "tp".
Models name their weight axes logically (models/transformer.py); a phase's `ShardingRules` maps
those names to mesh axes, outside the model. Tensor parallelism splits attention heads (query and
KV) and the MLP's hidden axis over "tp", Megatron-style: the partitioner inserts one all-reduce
after the attention output projection and one after the MLP down projection. The KV pool is
split the same way, on its kv_heads axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.engine.placement import PhaseParallel, Placement
from models.config import ModelConfig
from models.transformer import CausalLM, KVCache

if TYPE_CHECKING:
    from models.weights import WeightSource

TP_AXIS = "tp"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingRules:
    """Logical axis name -> mesh axis (None = replicated)."""

    rules: tuple[tuple[str, str | None], ...] = (
        ("heads", TP_AXIS), ("kv_heads", TP_AXIS), ("mlp", TP_AXIS),
        ("vocab", None), ("embed", None), ("head_dim", None), ("positions", None),
    )

    def spec(self, logical: tuple[str, ...]) -> P:
        table = dict(self.rules)
        return P(*(table.get(name) for name in logical))


def check_tp(config: ModelConfig, tp: int) -> None:
    if config.num_kv_heads % tp or config.num_heads % tp:
        raise ValueError(f"tp={tp} must divide num_heads={config.num_heads} and num_kv_heads={config.num_kv_heads}")
    if config.ffn_size % tp:
        raise ValueError(f"tp={tp} must divide ffn_size={config.ffn_size}")


def stage_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous [first, last) layer ranges, as even as possible, earlier stages taking extras."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pp={pp} must be between 1 and num_layers={num_layers}")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append((start, start + n))
        start += n
    return out


@dataclasses.dataclass(frozen=True)
class InstanceMeshes:
    """One instance's pipeline stages: meshes[s] is stage s's tp-device mesh."""

    meshes: tuple[Mesh, ...]

    @property
    def devices(self) -> list:
        return [d for m in self.meshes for d in m.devices.flat]


def instance_meshes(devs: list, phase: PhaseParallel) -> InstanceMeshes:
    """One instance on `devs` (stage-major: stage s takes devs[s*tp:(s+1)*tp])."""
    return InstanceMeshes(tuple(Mesh(np.array(devs[s * phase.tp : (s + 1) * phase.tp]), (TP_AXIS,)) for s in range(phase.pp)))


def carve(placement: Placement, devices: list | None = None) -> dict[str, list[InstanceMeshes]]:
    """Split devices into per-instance meshes: {"prefill": [...], "decode": [...]} (disaggregated)
    or {"colocated": [...]} otherwise. Explicit device ids in the placement win; else in order."""
    devices = list(jax.devices() if devices is None else devices)
    if placement.num_devices > len(devices):
        raise ValueError(f"placement needs {placement.num_devices} devices, only {len(devices)} are available")
    by_id = {d.id: d for d in devices}
    phases = [("prefill", placement.prefill), ("decode", placement.decode)] if placement.mode == "disaggregated" else [("colocated", placement.prefill)]
    out: dict[str, list[InstanceMeshes]] = {}
    cursor = 0
    for name, phase in phases:
        insts = []
        for r in range(phase.replicas):
            if phase.devices is not None:
                try:
                    devs = [by_id[i] for i in phase.devices[r]]
                except KeyError as e:
                    raise ValueError(f"{name} device id {e.args[0]} is not among {sorted(by_id)}") from None
            else:
                devs = devices[cursor : cursor + phase.devices_per_instance]
                cursor += phase.devices_per_instance
            insts.append(instance_meshes(devs, phase))
        out[name] = insts
    return out


def param_shardings(model: CausalLM, mesh: Mesh, rules: ShardingRules):
    """NamedSharding for every weight, from its logical axes."""
    boxed = model.abstract_params()
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, rules.spec(leaf.names)), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def stage_param_keys(config: ModelConfig, first: int, last: int) -> list[str]:
    """Top-level param keys a stage running layers [first, last) needs."""
    keys = [f"layers_{i}" for i in range(first, last)]
    if first == 0:
        keys.append("embed")
    if last == config.num_layers:
        keys.append("final_norm")
        keys.append("embed" if config.tie_embeddings else "lm_head")
    return sorted(set(keys))


def stage_shardings(model: CausalLM, mesh: Mesh, first: int, last: int, rules: ShardingRules | None = None) -> dict:
    """NamedSharding of every weight a stage running layers [first, last) holds (the params tree's
    subset: `stage_param_keys`), from the phase's rules."""
    shardings = param_shardings(model, mesh, rules or ShardingRules())
    return {k: shardings[k] for k in stage_param_keys(model.config, first, last)}


def shard_stage_params(model: CausalLM, params: WeightSource | dict, mesh: Mesh, first: int, last: int,
                       rules: ShardingRules | None = None):
    """The stage's subset of params placed on its mesh with the phase's rules. From a `WeightSource`
    each tensor goes from the checkpoint file (or the random init) straight to the stage's devices
    with its sharding, and the other stages' weights are never read; a params tree already in memory
    is resharded with device_put."""
    shardings = stage_shardings(model, mesh, first, last, rules)
    if isinstance(params, Mapping):
        return {k: jax.device_put(params[k], shardings[k]) for k in shardings}
    return params.load(shardings)


def cache_sharding(mesh: Mesh, num_layers: int) -> KVCache:
    s = NamedSharding(mesh, P(None, TP_AXIS, None, None))  # [NB, Hkv/tp, BS, D] per device
    return KVCache(k=(s,) * num_layers, v=(s,) * num_layers)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
