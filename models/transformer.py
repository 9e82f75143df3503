"""The decoder for both skeletons (OPT, llama family), in Flax Linen, over the paged KV cache.

Every weight is declared once, here, with its shape, dtype and logical axes
(`nn.with_logical_partitioning`); sharding rules per phase map the logical names to mesh axes
outside the model (dsjax/runtime/sharding.py). Logical axes used:

    vocab, embed, heads, kv_heads, head_dim, mlp, positions

Parameter tree (names are part of the weight-loading contract in models/weights.py):

    embed/tokens [V, E]            embed/positions [P + 2, E]   (OPT only)
    layers_{i}/attn_norm/{scale[,bias]} [E]
    layers_{i}/attn/{q [E, H, D], k [E, Hkv, D], v [E, Hkv, D], o [H, D, E]}
    layers_{i}/attn/{q_bias [H, D], k_bias, v_bias [Hkv, D]}   (OPT, and llama with qkv_bias: Qwen2)
    layers_{i}/attn/o_bias [E]                                  (OPT)
    layers_{i}/attn/{q_norm, k_norm}/scale [D]                  (llama with qk_norm: Qwen3)
    layers_{i}/mlp_norm/{scale[,bias]} [E]
    layers_{i}/mlp/{gate, up [E, F], down [F, E]} (llama) | {fc1 [E, F], fc1_bias, fc2 [F, E], fc2_bias} (OPT)
    final_norm/{scale[,bias]} [E]
    lm_head/kernel [E, V]          (absent when embeddings are tied)

`CausalLM` composes the pieces as functions over the params dict, so a pipeline stage runs the
same code on its slice of layers; its KV cache holds exactly those layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from models.attention import Backend, Meta, PrefillMeta, attend, write_kv
from models.config import ModelConfig
from models.placement import Shardings, insert, lookup, place
from models.rope import apply_rope, inv_freq

OPT_POSITION_OFFSET = 2  # OPT's learned position table is indexed by position + 2


@struct.dataclass
class KVCache:
    """Per-layer paged K and V arrays, each [num_blocks, num_kv_heads, block_size, head_dim]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def num_layers(self) -> int:
        return len(self.k)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init=None):
    init = init or nn.initializers.normal(stddev=0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _zeros(module, name, shape, axes, dtype):
    return _param(module, name, shape, axes, dtype, nn.initializers.zeros)


def _rms_norm(x, scale, eps: float):
    """RMSNorm over the last axis, statistics in float32 (as HF's LlamaRMSNorm / Qwen3RMSNorm)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class Norm(nn.Module):
    """LayerNorm with bias (OPT) or RMSNorm (llama); statistics in float32."""

    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [T, E] -> [T, E]
        e = self.config.hidden_size
        scale = _param(self, "scale", (e,), ("embed",), self.dtype, nn.initializers.ones)
        xf = x.astype(jnp.float32)
        if self.config.arch == "opt":
            bias = _zeros(self, "bias", (e,), ("embed",), self.dtype)
            xf = xf - xf.mean(-1, keepdims=True)
            y = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + self.config.norm_eps)
            return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
        return _rms_norm(x, scale, self.config.norm_eps)


class HeadNorm(nn.Module):
    """RMSNorm of each head's vector over head_dim (Qwen3's q_norm / k_norm): [T, H, D] -> same."""

    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (self.config.head_dim,), ("head_dim",), self.dtype, nn.initializers.ones)
        return _rms_norm(x, scale, self.config.norm_eps)


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    backend: Backend

    @nn.compact
    def __call__(self, x, k_cache, v_cache, meta: Meta):  # x [T, E]
        c = self.config
        e, h, hkv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        wq = _param(self, "q", (e, h, d), ("embed", "heads", "head_dim"), self.dtype)
        wk = _param(self, "k", (e, hkv, d), ("embed", "kv_heads", "head_dim"), self.dtype)
        wv = _param(self, "v", (e, hkv, d), ("embed", "kv_heads", "head_dim"), self.dtype)
        wo = _param(self, "o", (h, d, e), ("heads", "head_dim", "embed"), self.dtype)
        # Projections as plain [T, E] @ [E, H * D] matmuls over free reshapes of the row-major
        # weights: written as einsums over (h, d), XLA:CPU chose to transpose the 2.4 MB output
        # weight of opt-125m on every decode step (12 copies, ~25 ms of a 30 ms step at batch 1).
        t = x.shape[0]
        q = (x @ wq.reshape(e, h * d)).reshape(t, h, d)  # [T, H, D]
        k = (x @ wk.reshape(e, hkv * d)).reshape(t, hkv, d)  # [T, Hkv, D]
        v = (x @ wv.reshape(e, hkv * d)).reshape(t, hkv, d)
        if c.arch == "opt" or c.qkv_bias:
            q = q + _zeros(self, "q_bias", (h, d), ("heads", "head_dim"), self.dtype)
            k = k + _zeros(self, "k_bias", (hkv, d), ("kv_heads", "head_dim"), self.dtype)
            v = v + _zeros(self, "v_bias", (hkv, d), ("kv_heads", "head_dim"), self.dtype)
        if c.arch == "llama":
            if c.qk_norm:  # per head, over head_dim: under tensor parallelism no head is split
                q = HeadNorm(c, self.dtype, name="q_norm")(q)
                k = HeadNorm(c, self.dtype, name="k_norm")(k)
            freq = inv_freq(d, c.rope_theta, c.rope_scaling)
            q = apply_rope(q, meta.positions, freq)
            k = apply_rope(k, meta.positions, freq)
        k_cache, v_cache = write_kv(k_cache, v_cache, k, v, meta.slots)
        out = attend(q, k_cache, v_cache, meta, sm_scale=d**-0.5, backend=self.backend,
                     sliding_window=c.sliding_window, k=k, v=v)  # [T, H, D]
        y = out.reshape(t, h * d) @ wo.reshape(h * d, e)
        if c.arch == "opt":
            y = y + _zeros(self, "o_bias", (e,), ("embed",), self.dtype)
        return y, k_cache, v_cache


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [T, E] -> [T, E]
        e, f = self.config.hidden_size, self.config.ffn_size
        if self.config.arch == "opt":
            h = x @ _param(self, "fc1", (e, f), ("embed", "mlp"), self.dtype) + _zeros(self, "fc1_bias", (f,), ("mlp",), self.dtype)
            h = jax.nn.relu(h)
            return h @ _param(self, "fc2", (f, e), ("mlp", "embed"), self.dtype) + _zeros(self, "fc2_bias", (e,), ("embed",), self.dtype)
        gate = x @ _param(self, "gate", (e, f), ("embed", "mlp"), self.dtype)
        up = x @ _param(self, "up", (e, f), ("embed", "mlp"), self.dtype)
        return (jax.nn.silu(gate) * up) @ _param(self, "down", (f, e), ("mlp", "embed"), self.dtype)


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    backend: Backend

    @nn.compact
    def __call__(self, x, k_cache, v_cache, meta: Meta):  # pre-norm residual block, x [T, E]
        attn_out, k_cache, v_cache = Attention(self.config, self.dtype, self.backend, name="attn")(
            Norm(self.config, self.dtype, name="attn_norm")(x), k_cache, v_cache, meta
        )
        x = x + attn_out
        x = x + MLP(self.config, self.dtype, name="mlp")(Norm(self.config, self.dtype, name="mlp_norm")(x))
        return x, k_cache, v_cache


class Embed(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, token_ids, positions):  # [T], [T] -> [T, E]
        c = self.config
        table = _param(self, "tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"), self.dtype)
        x = jnp.take(table, token_ids, axis=0)
        if c.arch == "opt":
            pos_table = _param(
                self, "positions", (c.max_position + OPT_POSITION_OFFSET, c.hidden_size), ("positions", "embed"), self.dtype
            )
            x = x + jnp.take(pos_table, positions + OPT_POSITION_OFFSET, axis=0)
        return x


class Head(nn.Module):
    """Final norm and LM head; with tied embeddings the caller passes the token table."""

    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, tied_table=None):  # [N, E] -> [N, V] float32
        c = self.config
        x = Norm(c, self.dtype, name="final_norm")(x)
        if c.tie_embeddings:
            return jnp.einsum("te,ve->tv", x, tied_table, preferred_element_type=jnp.float32)
        w = _param(self, "kernel", (c.hidden_size, c.vocab_size), ("embed", "vocab"), self.dtype)
        return jnp.einsum("te,ev->tv", x, w, preferred_element_type=jnp.float32)


def _unbox(tree):
    return nn.meta.unbox(tree)


# Random init draws on the host below this many parameters, on the device above (CausalLM.init).
HOST_INIT_MAX_PARAMS = 500_000_000


@functools.lru_cache(maxsize=64)
def _normal_program(shape: tuple[int, ...], dtype: np.dtype, sharding) -> Any:
    """key -> normal(0.02) weights of `shape`, compiled to come out with `sharding` (None: default
    device). The threefry bits do not depend on the sharding, so neither do the weights."""
    def draw(key):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return jax.jit(draw) if sharding is None else jax.jit(draw, out_shardings=sharding)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CausalLM:
    """The decoder as functions over a plain params dict (tree documented at the top of the file).

    Each piece is its own Linen module applied to its own subtree, so a pipeline stage calls
    `run_layers` on its slice of layers with only those layers' params and cache, stage 0 adds
    `embed`, the last stage adds `logits`.
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    backend: Backend = "xla"

    def __post_init__(self) -> None:
        if self.config.sliding_window is not None and self.backend == "pallas":
            raise ValueError(
                f"sliding_window={self.config.sliding_window} (model {self.config.name!r}) is not supported by the "
                "Pallas attention kernels; use attention backend 'xla' or 'auto' (which then takes the jnp path)"
            )

    def _layer(self) -> DecoderLayer:
        return DecoderLayer(self.config, self.dtype, self.backend)

    def _dummy_meta(self, block_size: int = 1) -> PrefillMeta:
        z = jnp.zeros((1,), jnp.int32)
        return PrefillMeta(positions=z, slots=z, block_tables=jnp.zeros((1, 1), jnp.int32),
                           cu_q_lens=jnp.array([0, 1], jnp.int32), kv_lens=jnp.ones((1,), jnp.int32))

    def abstract_params(self):
        """Shapes, dtypes and logical axes of every weight, without allocating (boxed leaves)."""
        return jax.eval_shape(lambda: self._init_boxed(jax.random.PRNGKey(0)))

    def param_shapes(self):
        """The params tree as ShapeDtypeStructs (no logical-axis boxes)."""
        return _unbox(self.abstract_params())

    def _init_boxed(self, rng):
        c = self.config
        tok = jnp.zeros((1,), jnp.int32)
        x = jnp.zeros((1, c.hidden_size), self.dtype)
        cache = jnp.zeros((1, c.num_kv_heads, 1, c.head_dim), self.dtype)
        keys = jax.random.split(rng, c.num_layers + 2)
        params = {"embed": Embed(c, self.dtype).init(keys[0], tok, tok)["params"]}
        meta = self._dummy_meta()
        for i in range(c.num_layers):
            params[f"layers_{i}"] = self._layer().init(keys[i + 1], x, cache, cache, meta)["params"]
        head = Head(c, self.dtype).init(keys[-1], x, jnp.zeros((c.vocab_size, c.hidden_size), self.dtype))["params"]
        params["final_norm"] = head["final_norm"]
        if not c.tie_embeddings:
            params["lm_head"] = {"kernel": head["kernel"]}
        return params

    def init(self, rng, shardings: Shardings | None = None) -> dict:
        """Random weights as a plain dict: normal(0.02) matrices, unit norm scales, zero biases.

        Leaf i draws from its own stream seeded by (rng, i), so weights depend only on the seed, not
        on which of them are made or how they are sharded. Models under HOST_INIT_MAX_PARAMS draw on
        the host with numpy (no compilation: start-up of small models was dominated by compiling an
        init program); larger ones draw on the device. `shardings` (models/placement.py: a nested
        mapping over any subset of the tree) makes only those weights, each straight onto its
        devices: host draws are placed block by block, device draws come out of a program compiled
        for that output sharding. None: every weight, on the default device.
        """
        leaves, _ = jax.tree_util.tree_flatten_with_path(self.param_shapes())
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        on_host = self.config.num_params() < HOST_INIT_MAX_PARAMS
        out: dict = {}
        for i, (key_path, leaf) in enumerate(leaves):
            path = tuple(str(getattr(k, "key", k)) for k in key_path)
            wanted, sharding = lookup(shardings, path)
            if not wanted:
                continue
            if path[-1] == "scale" or path[-1].endswith("bias"):
                const = np.ones((), leaf.dtype) if path[-1] == "scale" else np.zeros((), leaf.dtype)
                value = place(np.broadcast_to(const, leaf.shape), sharding, leaf.dtype)
            elif on_host:
                draw = np.random.default_rng([seed, i]).standard_normal(leaf.shape, dtype=np.float32)
                draw *= 0.02  # in place: one host copy of the weight
                value = place(draw, sharding, leaf.dtype)
                del draw
            else:
                value = _normal_program(leaf.shape, np.dtype(leaf.dtype), sharding)(jax.random.PRNGKey(seed + i))
            insert(out, path, value)
        return out

    def embed(self, params, token_ids, positions):  # [T] -> [T, E]
        return Embed(self.config, self.dtype).apply({"params": params["embed"]}, token_ids, positions)

    def run_layers(self, params, x, cache: KVCache, meta: Meta, first_layer: int = 0) -> tuple[jax.Array, KVCache]:
        """x [T, E] through layers first_layer .. first_layer + cache.num_layers - 1."""
        layer = self._layer()
        ks, vs = list(cache.k), list(cache.v)
        for j in range(cache.num_layers):
            x, ks[j], vs[j] = layer.apply({"params": params[f"layers_{first_layer + j}"]}, x, ks[j], vs[j], meta)
        return x, KVCache(k=tuple(ks), v=tuple(vs))

    def logits(self, params, x):  # [N, E] -> [N, V] float32
        head_params = {"final_norm": params["final_norm"]}
        if self.config.tie_embeddings:
            return Head(self.config, self.dtype).apply({"params": head_params}, x, params["embed"]["tokens"])
        head_params["kernel"] = params["lm_head"]["kernel"]
        return Head(self.config, self.dtype).apply({"params": head_params}, x)

    def forward(self, params, token_ids, cache: KVCache, meta: Meta):
        """Whole model: [T] tokens -> ([T, E] final hidden states, updated cache)."""
        x = self.embed(params, token_ids, meta.positions)
        return self.run_layers(params, x, cache, meta)
