"""An independent-of-the-engine path through a model, for checks: every position's logits of one
sequence, run as a single prefill through a throwaway cache of one block of T rows plus the null
block (so it exercises the same paged write/attend path as the engine, without the runner,
scheduler or batch packing)."""

from __future__ import annotations

import jax.numpy as jnp

from models.attention import PrefillMeta
from models.transformer import CausalLM, KVCache


def prompt_logits(model: CausalLM, params, token_ids):
    """[T] tokens -> [T, V] float32 logits. Jit it with the model bound (`functools.partial`)."""
    t = token_ids.shape[0]
    c = model.config
    shape = (2, c.num_kv_heads, t, c.head_dim)  # [null block + one block of T rows, Hkv, T, D]
    cache = KVCache(k=tuple(jnp.zeros(shape, model.dtype) for _ in range(c.num_layers)),
                    v=tuple(jnp.zeros(shape, model.dtype) for _ in range(c.num_layers)))
    positions = jnp.arange(t, dtype=jnp.int32)
    meta = PrefillMeta(positions=positions, slots=t + positions, block_tables=jnp.ones((1, 1), jnp.int32),
                       cu_q_lens=jnp.array([0, t], jnp.int32), kv_lens=jnp.array([t], jnp.int32))
    x, _ = model.forward(params, token_ids, cache, meta)
    return model.logits(params, x)
