"""The two compiled programs: prefill and decode.

Both take the params, the KV pool (donated: the pool is updated in place), the token ids and the
step's metadata pytree, and return the sampled token per request plus the new pool. They differ
in their shape policy (dsjax/shapes.py) and their attention routine (selected by the metadata
type), not in a mode flag.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax.sampling import SamplingArrays, sample
from models.attention import DecodeMeta, PrefillMeta
from models.transformer import CausalLM, KVCache


def _prefill(model: CausalLM, params, cache: KVCache, token_ids, meta: PrefillMeta, sampling: SamplingArrays):
    # token_ids [T] packed; returns ([B] next tokens, cache)
    x, cache = model.forward(params, token_ids, cache, meta)  # [T, E]
    last = jnp.maximum(meta.cu_q_lens[1:] - 1, 0)  # [B] row of each request's last token
    logits = model.logits(params, x[last])  # [B, V]
    return sample(logits, sampling), cache


def _decode(model: CausalLM, params, cache: KVCache, token_ids, meta: DecodeMeta, sampling: SamplingArrays):
    # token_ids [B] one per request; returns ([B] next tokens, cache)
    x, cache = model.forward(params, token_ids, cache, meta)  # [B, E]
    return sample(model.logits(params, x), sampling), cache


@functools.lru_cache(maxsize=None)
def programs(model: CausalLM):
    """(prefill, decode) jitted for `model` (hashable, static), each donating the cache."""
    prefill = jax.jit(functools.partial(_prefill, model), donate_argnums=(1,))
    decode = jax.jit(functools.partial(_decode, model), donate_argnums=(1,))
    return prefill, decode
