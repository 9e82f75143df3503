"""The two compiled programs, prefill and decode, per pipeline stage.

Both take the stage's params, its KV pool (donated: updated in place), the stage input (token ids
on the first stage, hidden states [T, E] after) and the step's metadata pytree, and return the
stage output (hidden states, or on the last stage the sampled token per request) plus the new
pool. Prefill and decode differ in their shape policy (dsjax/engine/shapes.py) and their attention routine
(chosen by the metadata type), not in a mode flag. An unpipelined model is one stage that is both
first and last.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax.runtime.sampling import SamplingArrays, sample
from models.attention import DecodeMeta, PrefillMeta
from models.transformer import CausalLM, KVCache


def _stage(model: CausalLM, first: int, last: int, params, cache: KVCache, inputs, meta, sampling: SamplingArrays):
    assert cache.num_layers == last - first
    # inputs: [T] int32 token ids on stage 0, else [T, E] hidden states
    x = model.embed(params, inputs, meta.positions) if first == 0 else inputs
    x, cache = model.run_layers(params, x, cache, meta, first_layer=first)  # [T, E]
    if last < model.config.num_layers:
        return x, cache
    if isinstance(meta, PrefillMeta):
        x = x[jnp.maximum(meta.cu_q_lens[1:] - 1, 0)]  # [B, E] each request's last packed row
    return sample(model.logits(params, x), sampling), cache  # [B] int32


@functools.lru_cache(maxsize=None)
def stage_programs(model: CausalLM, first: int, last: int):
    """(prefill, decode) for layers [first, last); the metadata type picks the attention path, and
    separate jit objects keep the two programs' compilation caches (and shape buckets) apart."""
    fn = functools.partial(_stage, model, first, last)
    return jax.jit(fn, donate_argnums=(1,)), jax.jit(fn, donate_argnums=(1,))


def programs(model: CausalLM):
    """(prefill, decode) for the whole model as one stage."""
    return stage_programs(model, 0, model.config.num_layers)


__all__ = ["DecodeMeta", "PrefillMeta", "programs", "stage_programs"]
