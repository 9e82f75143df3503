"""Logit parity with Hugging Face transformers on tiny random checkpoints (float32, CPU, offline):
every family (OPT, LLaMA with each RoPE scaling, Qwen2, Qwen3, Mistral with a sliding window)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models.transformer import CausalLM
from models.weights import load_hf_checkpoint
from tests.support.dense import prompt_logits
from tests.support.hf_fixtures import load_hf_model, make_hf_checkpoint

MAX_REL_ERR = 1e-4

# RoPE scalings on the tiny LLaMA (head_dim 16). llama3 with original context 64: of the 8
# wavelengths 2*pi*5e5^(i/8), the first is kept (< 64/4), the second blended, the rest divided by 8;
# the 130-token prompt runs past the original context. Dynamic NTK is plain RoPE up to
# max_position_embeddings (64 here), the longest context the model then accepts.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 5e5}
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}
DYNAMIC_ROPE = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}

# name -> (arch, make_hf_checkpoint keyword arguments, prompt lengths). Each length compiles
# prompt_logits afresh, so they are few; every position of every prompt is compared, and the
# lengths cover a single token, 16-token block crossings and a long prompt.
VARIANTS = {
    "opt": ("opt", {}, (1, 17, 130)),
    "opt-sharded": ("opt", {"max_shard_size": "40KB", "seed": 1}, (33,)),
    "llama-gqa": ("llama", {}, (1, 17, 130)),
    "llama-tied-headdim32-theta5e5": ("llama", {"tie_word_embeddings": True, "head_dim": 32, "rope_theta": 5e5, "seed": 2}, (64,)),
    "llama-mqa-sharded": ("llama", {"num_key_value_heads": 1, "max_shard_size": "40KB", "seed": 3}, (33,)),
    "llama-bf16-file": ("llama", {"torch_dtype": torch.bfloat16, "seed": 4}, (17,)),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE, "seed": 5}, (17, 130)),
    "llama-linear-rope": ("llama", {"rope_parameters": LINEAR_ROPE, "seed": 6}, (33,)),
    "llama-dynamic-rope": ("llama", {"rope_parameters": DYNAMIC_ROPE, "max_position_embeddings": 64, "seed": 7}, (64,)),
    "qwen2-tied-qkv-bias": ("qwen2", {"seed": 8}, (1, 17, 130)),
    "qwen3-qk-norm-headdim32": ("qwen3", {"seed": 9}, (17, 130)),
    # window 24: the 17-token prompt stays inside it, the 130-token one slides across 8 blocks
    "mistral-sliding-window": ("mistral", {"seed": 10}, (17, 130)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, checkpoint path, torch reference model, prompt lengths), built once per variant."""
    arch, kwargs, lengths = VARIANTS[request.param]
    path = make_hf_checkpoint(tmp_path_factory.mktemp("parity"), arch, **kwargs)
    return request.param, path, load_hf_model(path), lengths


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= MAX_REL_ERR, f"{what}: max relative error {rel:.2e} > {MAX_REL_ERR:.0e}"
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=5e-5, err_msg=what)


def test_prompt_logits_match_transformers(variant):
    name, path, hf_model, lengths = variant
    config, params = load_hf_checkpoint(path, dtype=jnp.float32)
    logits_fn = jax.jit(functools.partial(prompt_logits, CausalLM(config=config, dtype=jnp.float32)))
    rng = np.random.default_rng(len(name))
    for length in lengths:
        ids = rng.integers(0, config.vocab_size, size=length)
        ours = np.asarray(logits_fn(params, jnp.asarray(ids, jnp.int32)))
        with torch.no_grad():
            ref = hf_model(torch.as_tensor(ids[None])).logits[0].numpy()
        assert ours.shape == ref.shape == (length, config.vocab_size)
        assert_logits_close(ours, ref, f"{name}, prompt length {length}")


def test_config_matches_hf_model(variant):
    name, path, hf_model, _ = variant
    config, _ = load_hf_checkpoint(path, dtype=jnp.float32)
    hf = hf_model.config
    assert config.family == hf.model_type
    assert config.arch == ("opt" if hf.model_type == "opt" else "llama")
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads) == (
        hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads
    )
    assert config.tie_embeddings == hf.tie_word_embeddings
    assert config.max_position == hf.max_position_embeddings
    assert (config.bos_token_id, config.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert config.all_eos_token_ids == (hf.eos_token_id,)
    if config.arch == "llama":
        assert config.num_kv_heads == hf.num_key_value_heads
        assert config.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
        rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}  # transformers 5 | 4
        assert config.rope_theta == rope["rope_theta"]
        assert (config.rope_scaling.rope_type if config.rope_scaling else "default") == rope.get("rope_type", "default")
        assert config.norm_eps == hf.rms_norm_eps
        assert (config.qkv_bias, config.qk_norm) == (hf.model_type == "qwen2", hf.model_type == "qwen3")
        assert config.sliding_window == getattr(hf, "sliding_window", None)
