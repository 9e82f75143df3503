"""Build an engine for a placement and a mode: the one constructor the offline API and the
servers share.

- disaggregated: `placement.prefill.replicas` prefill instances and `placement.decode.replicas`
  decode instances, each on its own devices (dsjax/disagg.py);
- colocated / chunked: `placement.prefill.replicas` independent instances doing both phases
  (dsjax/engine.py).
With no placement the model runs unsharded on the default device (colocated).
"""

from __future__ import annotations

from dsjax.disagg import DecodeInstance, DisaggEngine, PrefillInstance
from dsjax.engine import Engine, ReplicatedEngine
from dsjax.kv_cache import CacheConfig
from dsjax.placement import MODES, Placement
from dsjax.runner import ModelRunner
from dsjax.scheduler import SchedulerConfig
from dsjax.sharding import ShardingRules, carve
from models.transformer import CausalLM


def build_engine(model: CausalLM, params, *, placement: Placement | None, mode: str, cache: CacheConfig,
                 scheduler: SchedulerConfig, devices: list | None = None, prefill_rules: ShardingRules | None = None,
                 decode_rules: ShardingRules | None = None):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if placement is None:
        if mode == "disaggregated":
            raise ValueError("mode='disaggregated' needs a placement (which devices prefill and decode use)")
        return Engine(ModelRunner(model, params, cache), scheduler, chunked=mode == "chunked")
    if placement.mode != mode:
        placement = Placement(prefill=placement.prefill, decode=placement.decode if mode == "disaggregated" else placement.prefill, mode=mode)
    meshes = carve(placement, devices)
    if mode == "disaggregated":
        prefill = [PrefillInstance(ModelRunner(model, params, cache, inst.meshes, prefill_rules), scheduler) for inst in meshes["prefill"]]
        decode = [DecodeInstance(ModelRunner(model, params, cache, inst.meshes, decode_rules), scheduler) for inst in meshes["decode"]]
        return DisaggEngine(prefill, decode)
    engines = [Engine(ModelRunner(model, params, cache, inst.meshes, prefill_rules), scheduler, chunked=mode == "chunked") for inst in meshes["colocated"]]
    return engines[0] if len(engines) == 1 else ReplicatedEngine(engines)
