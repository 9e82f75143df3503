"""The planner's specs of the engine's own presets agree with the models the engine builds."""

import pytest

from dsjax.planner.model_spec import MODELS
from models.config import get_preset

ENGINE_PRESETS = [name for name, spec in MODELS.items() if spec.hf_name == name]


@pytest.mark.parametrize("name", ENGINE_PRESETS)
def test_planner_spec_matches_the_engine_preset(name):
    spec, config = MODELS[name], get_preset(name)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.hidden_size, spec.ffn_size, spec.vocab_size) == (
        config.num_layers, config.num_heads, config.num_kv_heads, config.hidden_size, config.ffn_size, config.vocab_size)
    assert spec.num_params == config.num_params()
    assert spec.dtype_bytes == 4  # profiled in float32 on the CPU


def test_the_bandwidth_bound_benchmark_model_is_specified():
    assert "opt-125m" in ENGINE_PRESETS
    assert MODELS["opt-125m"].weight_bytes > 8 * 32e6  # >= 8x this machine's last-level cache
