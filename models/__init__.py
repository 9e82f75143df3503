"""Flax decoder models (OPT, LLaMA family), presets and weight loading."""

from models.attention import DecodeMeta, PrefillMeta
from models.config import PRESETS, ModelConfig, get_preset
from models.transformer import CausalLM, KVCache
from models.weights import load_hf_checkpoint, load_model, restore_params, save_params

__all__ = ["CausalLM", "DecodeMeta", "KVCache", "ModelConfig", "PRESETS", "PrefillMeta", "get_preset",
           "load_hf_checkpoint", "load_model", "restore_params", "save_params"]
