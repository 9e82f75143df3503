"""A disaggregated engine on emulated devices whose every step takes a fixed time: for tests of
the threaded engine and its backend that need real instances and no JAX."""

from dsjax.engine.disaggregated import DecodeInstance, DisaggEngine, PrefillInstance
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.planner.latency import LatencyCoeffs, LatencyModel
from dsjax.runtime.emulated import EmulatedRunner
from dsjax.runtime.kv_cache import CacheConfig
from models.config import PRESETS


def fixed_step_disagg_engine(cfg: SchedulerConfig, *, num_decode: int = 1, step_ms: float = 1.0,
                             num_blocks: int = 64) -> DisaggEngine:
    """One prefill and `num_decode` decode instances of OPT-13B's byte counts; a prefill or decode
    step takes `step_ms` whatever its batch."""
    fixed = (step_ms, 0.0, 0.0)
    lat = LatencyModel(coeffs=LatencyCoeffs(prefill=fixed, decode_small=fixed, decode_large=fixed))

    def runner():
        return EmulatedRunner(PRESETS["opt-13b"], CacheConfig(num_blocks=num_blocks, block_size=16), lat)

    return DisaggEngine([PrefillInstance(runner(), cfg)], [DecodeInstance(runner(), cfg) for _ in range(num_decode)])
