"""Tiny random Hugging Face checkpoints for parity tests (no downloads).

    path = make_hf_checkpoint(tmp_path, "llama", num_key_value_heads=1)
    hf_model = load_hf_model(path)  # the torch reference, float32, eval mode

Every parameter, norms and biases included, is redrawn at random so a swapped or dropped tensor
changes the logits; matrices use std 0.15, large enough that attention is far from uniform and
positions matter. Token ids follow the byte tokenizer (bos 256, eos 257, pad 258) so a directory
without tokenizer files still agrees with `models.tokenizer`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

BYTE_SPECIAL_IDS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}

TINY_HF_CONFIGS = {
    "opt": dict(
        vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=64, **BYTE_SPECIAL_IDS,
    ),
    "llama": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, **BYTE_SPECIAL_IDS,
    ),
    # Qwen2: q/k/v biases; tied embeddings as the small Qwen2.5 checkpoints.
    "qwen2": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **BYTE_SPECIAL_IDS,
    ),
    # Qwen3: q/k RMSNorm, head_dim 32 != hidden_size / heads (as the real ones: 128 vs 2560 / 32).
    "qwen3": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-5, **BYTE_SPECIAL_IDS,
    ),
    # Mistral: a 24-token sliding window (contexts in the tests cross it and several 16-token blocks).
    "mistral": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, sliding_window=24, **BYTE_SPECIAL_IDS,
    ),
}
_MODELS = {
    "opt": (OPTConfig, OPTForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied tensors appear once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)  # norm scales near 1
            elif p.ndim == 1:
                p.copy_(0.1 * noise)  # biases
            else:
                p.copy_(std * noise)


def make_hf_torch_model(arch: str, *, seed: int = 0, std: float = 0.15, **overrides) -> torch.nn.Module:
    """A tiny random `*ForCausalLM` of family `arch` (float32, eval); overrides go to the HF config."""
    if arch not in _MODELS:
        raise ValueError(f"arch={arch!r} must be one of {sorted(_MODELS)}")
    config_cls, model_cls = _MODELS[arch]
    config = config_cls(**{**TINY_HF_CONFIGS[arch], **overrides})
    model = model_cls(config).to(torch.float32).eval()
    _randomize(model, seed, std)
    return model


def make_hf_checkpoint(tmpdir, arch: str, *, seed: int = 0, std: float = 0.15, max_shard_size: str | None = None,
                       torch_dtype: torch.dtype = torch.float32, **overrides) -> str:
    """Save a tiny random HF model as safetensors in a fresh directory under `tmpdir`; returns its path.

    `max_shard_size` (e.g. "40KB") forces a sharded save with `model.safetensors.index.json`;
    `torch_dtype` (e.g. torch.bfloat16) sets the stored dtype; other keyword arguments override
    the HF config (e.g. `tie_word_embeddings=True`, `num_key_value_heads=1`, `head_dim=32`).
    """
    model = make_hf_torch_model(arch, seed=seed, std=std, **overrides).to(torch_dtype)
    path = Path(tempfile.mkdtemp(prefix=f"hf-{arch}-", dir=tmpdir))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return str(path)


def load_hf_model(path) -> torch.nn.Module:
    """The saved checkpoint as a float32 torch model in eval mode (the parity reference)."""
    return AutoModelForCausalLM.from_pretrained(path).to(torch.float32).eval()
