"""config.json / generation_config.json -> ModelConfig: families, RoPE scaling, sliding windows,
EOS ids and sampling defaults, and a ValueError naming the field for what is not supported."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.attention import PrefillMeta, attend
from models.config import GenerationDefaults, ModelConfig, RopeScaling
from models.hf_config import config_from_hf, load_hf_config
from models.rope import inv_freq
from models.transformer import CausalLM
from tests.support.hf_fixtures import TINY_HF_CONFIGS


def hf_dict(family: str, **edits) -> dict:
    return {**TINY_HF_CONFIGS.get(family, TINY_HF_CONFIGS["llama"]), "model_type": family, **edits}


@pytest.mark.parametrize(
    "family, edits, message",
    [
        ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before=False"),
        ("opt", {"word_embed_proj_dim": 32}, "word_embed_proj_dim=32 != hidden_size=64"),
        ("opt", {"activation_function": "gelu"}, "activation_function='gelu'"),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling has rope_type='yarn'"),
        ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5}}, "rope_parameters has rope_type='longrope'"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "needs a positive 'factor', got None"),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
         "needs a number 'low_freq_factor', got None"),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
         "low_freq_factor=4.0, high_freq_factor=1.0"),
        ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ("llama", {"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "rope_parameters=.*per-layer-type"),
        ("llama", {"attention_bias": True}, "attention_bias=True"),
        ("llama", {"mlp_bias": True}, "mlp_bias=True"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("llama", {"hidden_size": None}, "lacks 'hidden_size'"),
        ("qwen3", {"attention_bias": True}, "attention_bias=True is not supported for model_type='qwen3'"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}, "use_sliding_window=True"),
        ("qwen3", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types="),
        ("mistral", {"sliding_window": 0}, "sliding_window=0"),
        ("gemma", {}, "unsupported model_type='gemma'"),
        ("llama", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ],
)
def test_unsupported_configs(family, edits, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf_dict(family, **edits))


def test_defaults():
    llama = {k: v for k, v in TINY_HF_CONFIGS["llama"].items() if k not in ("num_key_value_heads", "rms_norm_eps")}
    config = config_from_hf({**llama, "model_type": "llama", "rope_theta": 1234.0})
    assert (config.num_kv_heads, config.head_dim, config.norm_eps, config.rope_theta) == (4, 16, 1e-6, 1234.0)
    assert not config.tie_embeddings and config.rope_scaling is None and config.family == "llama"
    assert config_from_hf({**TINY_HF_CONFIGS["opt"], "model_type": "opt"}).tie_embeddings
    qwen3 = config_from_hf({k: v for k, v in hf_dict("qwen3").items() if k != "head_dim"})
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias) == (128, True, False)  # HF Qwen3Config's default
    qwen2 = config_from_hf(hf_dict("qwen2", tie_word_embeddings=False))
    assert (qwen2.arch, qwen2.qkv_bias, qwen2.qk_norm, qwen2.rope_theta) == ("llama", True, False, 1e6)
    assert not qwen2.tie_embeddings


@pytest.mark.parametrize("edits, window", [
    ({"sliding_window": 24}, 24),
    ({"sliding_window": None}, None),  # Mistral 7B v0.2 / v0.3
    ({"sliding_window": 512}, None),  # covers the whole context: plain causal attention
    ({}, None),  # absent: HF's default 4096 >= max_position_embeddings 512
    ({"max_position_embeddings": 32768}, 4096),  # absent, Mistral 7B v0.1's context
])
def test_mistral_sliding_window(edits, window):
    hf = {k: v for k, v in hf_dict("mistral").items() if k != "sliding_window"}  # the fixture's 24 dropped
    config = config_from_hf({**hf, **edits})
    assert config.sliding_window == window


def test_qwen_windows_that_never_apply_are_accepted():
    """Released Qwen2.5 / Qwen3 configs carry a sliding_window but leave use_sliding_window off."""
    for family in ("qwen2", "qwen3"):
        off = config_from_hf(hf_dict(family, use_sliding_window=False, sliding_window=4096, max_window_layers=1))
        wide = config_from_hf(hf_dict(family, use_sliding_window=True, sliding_window=512, max_window_layers=0))
        assert off.sliding_window is None and wide.sliding_window is None


def test_llama31_rope_scaling_old_and_new_layouts():
    """Llama 3.1's config.json (rope_scaling + top-level rope_theta) and transformers 5's rope_parameters."""
    block = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    want = RopeScaling(rope_type="llama3", factor=8.0, original_max_position=8192, low_freq_factor=1.0, high_freq_factor=4.0)
    old = config_from_hf(hf_dict("llama", rope_theta=5e5, rope_scaling={**block, "rope_type": "llama3"}))
    new = config_from_hf(hf_dict("llama", rope_parameters={**block, "rope_type": "llama3", "rope_theta": 5e5}))
    assert old.rope_scaling == new.rope_scaling == want and old.rope_theta == new.rope_theta == 5e5
    legacy = config_from_hf(hf_dict("llama", rope_scaling={"type": "linear", "factor": 2.0}))
    assert legacy.rope_scaling == RopeScaling(rope_type="linear", factor=2.0, original_max_position=512)


def test_dynamic_rope_keeps_the_context_within_the_original():
    config = config_from_hf(hf_dict("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
    assert config.rope_scaling.original_max_position == config.max_position == 512
    np.testing.assert_array_equal(inv_freq(16, 1e4, config.rope_scaling), inv_freq(16, 1e4))
    dataclasses.replace(config, max_position=256)  # a server may shorten the context
    with pytest.raises(ValueError, match="dynamic RoPE is exact only up to original_max_position=512"):
        dataclasses.replace(config, max_position=1024)


@pytest.mark.parametrize("params", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 5e5},  # Llama 3.1 8B
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 5e5},  # Llama 3.2 1B / 3B
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
])
def test_inverse_frequencies_match_transformers(params):
    """At real sizes (head_dim 128, 131072 positions), against transformers' own RoPE init."""
    hf = dict(vocab_size=128, hidden_size=4096, num_attention_heads=32, num_hidden_layers=1, intermediate_size=64,
              max_position_embeddings=131072 if params["rope_type"] != "dynamic" else 8192)
    ours = config_from_hf({**hf, "model_type": "llama", "rope_parameters": params})
    want, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](LlamaConfig(**hf, rope_parameters=dict(params)), torch.device("cpu"))
    assert scale == 1.0
    np.testing.assert_allclose(inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling), want.numpy(), rtol=2e-6)


def test_eos_ids_and_sampling_defaults_from_generation_config(tmp_path):
    """Llama-3-Instruct style: config.json names one EOS, generation_config.json several."""
    (tmp_path / "config.json").write_text(json.dumps(hf_dict("llama", eos_token_id=257, bos_token_id=None)))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 256, "eos_token_id": [300, 257, 301], "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    config = load_hf_config(tmp_path)
    assert (config.bos_token_id, config.eos_token_id) == (256, 257)
    assert config.eos_token_ids == config.all_eos_token_ids == (257, 300, 301)
    assert config.generation == GenerationDefaults(do_sample=True, temperature=0.6, top_p=0.9)
    assert config.generation.sampling_kwargs() == {"temperature": 0.6, "top_p": 0.9}
    hash(config)  # still a static jit argument


@pytest.mark.parametrize("gen, kwargs", [
    ({}, {}),
    ({"do_sample": False, "temperature": 0.7}, {"temperature": 0.0}),  # HF generate decodes greedily
    ({"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},  # Qwen2.5-Instruct's
     {"temperature": 0.7, "top_k": 20, "top_p": 0.8}),
])
def test_sampling_kwargs(gen, kwargs):
    assert config_from_hf(hf_dict("qwen2"), generation=gen).generation.sampling_kwargs() == kwargs


def test_bad_generation_config_names_the_field():
    with pytest.raises(ValueError, match="generation_config.json: top_k=0.5"):
        config_from_hf(hf_dict("llama"), generation={"top_k": 0.5})


def test_model_config_invariants():
    base = config_from_hf(hf_dict("opt"))
    for field, value in (("qkv_bias", True), ("qk_norm", True), ("sliding_window", 8)):
        with pytest.raises(ValueError, match=f"{field}=.* applies to the llama decoder only"):
            dataclasses.replace(base, **{field: value})
    assert dataclasses.replace(base, eos_token_ids=[1, 2]).eos_token_ids == (1, 2)
    assert ModelConfig.__dataclass_fields__["generation"].default_factory() == GenerationDefaults()


def test_sliding_window_refuses_the_pallas_kernels():
    config = config_from_hf(hf_dict("mistral", sliding_window=24))
    with pytest.raises(ValueError, match="sliding_window=24 .*not supported by the Pallas attention kernels"):
        CausalLM(config=config, backend="pallas")
    CausalLM(config=config, backend="auto")
    q = jnp.zeros((1, 4, 16), jnp.float32)
    cache = jnp.zeros((2, 2, 16, 16), jnp.float32)
    one = jnp.zeros((1,), jnp.int32)
    meta = PrefillMeta(positions=one, slots=one, block_tables=jnp.ones((1, 1), jnp.int32),
                       cu_q_lens=jnp.array([0, 1], jnp.int32), kv_lens=jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window=24 is not supported by the Pallas kernels"):
        attend(q, cache, cache, meta, sm_scale=1.0, backend="pallas", sliding_window=24)
