"""Token sampling inside the jitted programs: greedy, temperature, top-k, top-p, per-request keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SamplingArrays:
    """Per-row sampling parameters, [B] each; padding rows are greedy."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    seed: jax.Array  # uint32 per request
    step: jax.Array  # int32 index of the output token being sampled (key = fold_in(seed, step))

    @classmethod
    def from_requests(cls, reqs, batch: int, rows=None) -> "SamplingArrays":
        """Request i's parameters on row rows[i] (default i); the other rows are greedy padding."""
        temp = np.zeros(batch, np.float32)
        top_k = np.zeros(batch, np.int32)
        top_p = np.ones(batch, np.float32)
        seed = np.zeros(batch, np.uint32)
        step = np.zeros(batch, np.int32)
        for i, r in zip(range(len(reqs)) if rows is None else rows, reqs, strict=True):
            sp = r.sampling
            temp[i], top_k[i], top_p[i] = sp.temperature, sp.top_k, sp.top_p
            seed[i], step[i] = r.seed, len(r.output_token_ids)
        return cls(temperature=temp, top_k=top_k, top_p=top_p, seed=seed, step=step)


def _sample_rows(logits, s: SamplingArrays):
    b, v = logits.shape
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)
    x = logits / temp[:, None]  # [B, V]
    x_sorted = jnp.sort(x, axis=-1)[:, ::-1]  # descending
    ranks = jnp.arange(v, dtype=jnp.int32)[None, :]
    # top-k: drop everything below the k-th largest value.
    use_k = s.top_k > 0
    kth = jnp.take_along_axis(x_sorted, jnp.clip(s.top_k - 1, 0, v - 1)[:, None], axis=-1)  # [B, 1]
    x = jnp.where(use_k[:, None] & (x < kth), -jnp.inf, x)
    x_sorted = jnp.where(use_k[:, None] & (ranks >= s.top_k[:, None]), -jnp.inf, x_sorted)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    p_sorted = jax.nn.softmax(x_sorted, axis=-1)
    mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
    num_keep = jnp.maximum(jnp.sum(mass_before < s.top_p[:, None], axis=-1), 1)  # [B]
    cutoff = jnp.take_along_axis(x_sorted, (num_keep - 1)[:, None], axis=-1)
    x = jnp.where(x < cutoff, -jnp.inf, x)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(s.seed, s.step)
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)


def sample(logits, s: SamplingArrays):
    """logits [B, V] float32 -> token ids [B] int32. All-greedy batches skip the sort."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(jnp.any(s.temperature > 0), lambda: _sample_rows(logits, s), lambda: greedy)
    return jnp.where(s.temperature > 0, sampled, greedy)
