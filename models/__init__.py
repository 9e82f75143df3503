"""Flax decoder models (OPT; the LLaMA family: LLaMA, Qwen2, Qwen3, Mistral), presets, tokenizers,
chat templates and weight loading.

Names are imported on first use, so `models.config` alone (what the router needs) loads no jax.
"""

import importlib

_EXPORTS = {
    "DecodeMeta": "attention", "PrefillMeta": "attention",
    "PRESETS": "config", "ModelConfig": "config", "get_preset": "config", "GenerationDefaults": "config",
    "RopeScaling": "config", "load_hf_config": "hf_config",
    "CausalLM": "transformer", "KVCache": "transformer",
    "load_hf_checkpoint": "weights", "load_model": "weights", "restore_params": "weights", "save_params": "weights",
    "WeightSource": "weights", "open_weights": "weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"models.{_EXPORTS[name]}"), name)
