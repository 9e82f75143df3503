"""A LLaMA written for training: plain causal attention over packed rows, parameters under the
Hugging Face names and layouts, so the trained tree is saved as a `LlamaForCausalLM` checkpoint
as is and the serving stack loads it through its ordinary HF path (models/weights.py).

It is deliberately separate from models/transformer.py (the serving model reads and writes a paged
KV cache); the default model's parity test checks the two agree through `transformers`.

Layouts (HF `nn.Linear` weights are [out, in]):

    model.embed_tokens.weight                 [V, E]  (tied: also the LM head)
    model.layers.{i}.self_attn.q_proj.weight  [H*D, E]     k_proj / v_proj [Hkv*D, E]
    model.layers.{i}.self_attn.o_proj.weight  [E, H*D]
    model.layers.{i}.mlp.gate_proj.weight     [F, E]       up_proj [F, E]    down_proj [E, F]
    model.layers.{i}.input_layernorm.weight   [E]          post_attention_layernorm.weight [E]
    model.norm.weight                         [E]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaShape:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden={self.hidden}, heads={self.heads}, kv_heads={self.kv_heads} do not divide")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def hf_config(self, *, max_positions: int, bos_id: int, eos_id: int, pad_id: int) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "intermediate_size": self.intermediate, "hidden_act": "silu",
            "max_position_embeddings": max_positions, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "tie_word_embeddings": True, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        }


def init_params(shape: LlamaShape, seed: int) -> dict[str, jax.Array]:
    """Normal(0.02) weights; the projections into the residual stream scaled by 1/sqrt(2L)."""
    e, d, f = shape.hidden, shape.head_dim, shape.intermediate
    out_std = 0.02 / math.sqrt(2 * shape.layers)
    specs = {"model.embed_tokens.weight": ((shape.vocab_size, e), 0.02), "model.norm.weight": ((e,), None)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs |= {
            p + "self_attn.q_proj.weight": ((shape.heads * d, e), 0.02),
            p + "self_attn.k_proj.weight": ((shape.kv_heads * d, e), 0.02),
            p + "self_attn.v_proj.weight": ((shape.kv_heads * d, e), 0.02),
            p + "self_attn.o_proj.weight": ((e, shape.heads * d), out_std),
            p + "mlp.gate_proj.weight": ((f, e), 0.02),
            p + "mlp.up_proj.weight": ((f, e), 0.02),
            p + "mlp.down_proj.weight": ((e, f), out_std),
            p + "input_layernorm.weight": ((e,), None),
            p + "post_attention_layernorm.weight": ((e,), None),
        }
    keys = jax.random.split(jax.random.key(seed), len(specs))
    return {name: (jnp.ones(dims, jnp.float32) if std is None else std * jax.random.normal(k, dims, jnp.float32))
            for k, (name, (dims, std)) in zip(keys, sorted(specs.items()))}


def _rms_norm(x, w, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
    """HF LLaMA's rotate-half RoPE: x [B, T, H, D], positions [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def forward(params, shape: LlamaShape, tokens, segments, positions):
    """Logits [B, T, V] for packed rows; token t attends to t' <= t of the same segment."""
    b, t = tokens.shape
    h, hkv, d = shape.heads, shape.kv_heads, shape.head_dim
    same = segments[:, :, None] == segments[:, None, :]
    mask = same & jnp.tril(jnp.ones((t, t), bool))[None]  # [B, T, T]
    x = params["model.embed_tokens.weight"][tokens]
    for i in range(shape.layers):
        p = lambda n: params[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        y = _rms_norm(x, p("input_layernorm"), shape.norm_eps)
        q = _rope((y @ p("self_attn.q_proj").T).reshape(b, t, h, d), positions, shape.rope_theta)
        k = _rope((y @ p("self_attn.k_proj").T).reshape(b, t, hkv, d), positions, shape.rope_theta)
        v = (y @ p("self_attn.v_proj").T).reshape(b, t, hkv, d)
        q = q.reshape(b, t, hkv, h // hkv, d)  # query heads grouped by the KV head they share
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(d)
        scores = jnp.where(mask[:, None, None], scores, -1e30)
        attn = jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, h * d)
        x = x + attn @ p("self_attn.o_proj").T
        y = _rms_norm(x, p("post_attention_layernorm"), shape.norm_eps)
        x = x + (jax.nn.silu(y @ p("mlp.gate_proj").T) * (y @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    x = _rms_norm(x, params["model.norm.weight"], shape.norm_eps)
    return x @ params["model.embed_tokens.weight"].T


def loss_fn(params, shape: LlamaShape, rows_tokens, rows_segments, rows_positions):
    """Mean next-token cross-entropy (nats) over targets inside the same document as their input."""
    import optax

    inputs, targets = rows_tokens[:, :-1], rows_tokens[:, 1:]
    seg_in, seg_out = rows_segments[:, :-1], rows_segments[:, 1:]
    logits = forward(params, shape, inputs, seg_in, rows_positions[:, :-1])
    valid = (seg_in == seg_out) & (seg_out >= 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)


def greedy(params, shape: LlamaShape, prompt: list[int], steps: int, stop: set[int]) -> list[int]:
    """Greedy continuation without a cache (a check of the trained weights, not a server)."""
    fwd = jax.jit(lambda p, toks: forward(p, shape, toks, jnp.zeros_like(toks), jnp.arange(toks.shape[1])[None]))
    ids = list(prompt)
    for _ in range(steps):
        nxt = int(np.argmax(np.asarray(fwd(params, jnp.asarray([ids], jnp.int32)))[0, -1]))
        ids.append(nxt)
        if nxt in stop:
            break
    return ids[len(prompt):]
