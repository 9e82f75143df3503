"""Builders of small paged-attention inputs for tests (numpy, host side).

The cache they build is adversarial: physical block 0 is a "null" block, every table entry past a
request's used blocks points at it, block ids are shuffled, and every slot that holds no valid
token (the null block, spare blocks, the rows past kv_len in a request's last block) is NaN when
`poison=True`. A kernel that reads a slot it must not touch, or multiplies a garbage value by a
zero probability, turns its output NaN.

The pools are head-major, `[num_blocks, num_kv_heads, block_size, head_dim]` (the kernels' contract):
token p of a request is row p % block_size of physical block block_tables[b, p // block_size], for
every KV head. The contiguous copies next to them stay token-major, `[kv_len, num_kv_heads, head_dim]`,
the layout the dense float64 attention below reads.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


def _round_to(x, dtype) -> np.ndarray:
    """x rounded through `dtype`, back as float32 (so contiguous copies equal the cached values)."""
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class PagedKV:
    k_cache: jnp.ndarray  # [num_blocks, Hkv, block_size, D], head-major
    v_cache: jnp.ndarray  # [num_blocks, Hkv, block_size, D]
    block_tables: jnp.ndarray  # [B, max_blocks] int32
    kv_lens: jnp.ndarray  # [B] int32
    k_seqs: list[np.ndarray]  # per request [kv_len, Hkv, D] float32, the same values contiguous
    v_seqs: list[np.ndarray]


def make_paged_kv(
    rng: np.random.Generator,
    *,
    kv_lens,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype,
    max_blocks: int | None = None,
    num_spare_blocks: int = 2,
    poison: bool = True,
) -> PagedKV:
    """A paged cache holding random K/V for requests of the given kv_lens (see the module doc)."""
    kv_lens = [int(n) for n in kv_lens]
    blocks_needed = [-(-n // block_size) for n in kv_lens]
    if max_blocks is None:
        max_blocks = max(1, max(blocks_needed))
    if max(blocks_needed) > max_blocks:
        raise ValueError(f"{max_blocks=} is too small for {kv_lens=} at {block_size=}")
    num_blocks = 1 + sum(blocks_needed) + num_spare_blocks  # block 0 is the null block
    shape = (num_blocks, num_kv_heads, block_size, head_dim)  # head-major
    fill = np.nan if poison else 0.0
    k_cache = np.full(shape, fill, np.float32)
    v_cache = np.full(shape, fill, np.float32)
    block_ids = rng.permutation(np.arange(1, num_blocks))
    block_tables = np.zeros((len(kv_lens), max_blocks), np.int32)
    k_seqs, v_seqs = [], []
    next_id = 0
    for b, (kv_len, n_blocks) in enumerate(zip(kv_lens, blocks_needed)):
        k_seq = _round_to(rng.standard_normal((kv_len, num_kv_heads, head_dim)), dtype)
        v_seq = _round_to(rng.standard_normal((kv_len, num_kv_heads, head_dim)), dtype)
        ids = block_ids[next_id:next_id + n_blocks]
        next_id += n_blocks
        block_tables[b, :n_blocks] = ids
        for p in range(kv_len):
            # Token p's [Hkv, D] goes to one row of its block, across all the head tiles.
            k_cache[ids[p // block_size], :, p % block_size] = k_seq[p]
            v_cache[ids[p // block_size], :, p % block_size] = v_seq[p]
        k_seqs.append(k_seq)
        v_seqs.append(v_seq)
    return PagedKV(
        k_cache=jnp.asarray(k_cache, dtype),
        v_cache=jnp.asarray(v_cache, dtype),
        block_tables=jnp.asarray(block_tables),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        k_seqs=k_seqs,
        v_seqs=v_seqs,
    )


def pack_queries(
    rng: np.random.Generator, *, q_lens, num_q_heads: int, head_dim: int, dtype, num_padding_rows: int = 0
):
    """Packed queries [sum(q_lens) + num_padding_rows, Hq, D] and cu_q_lens [B + 1] int32.

    Padding rows hold random (finite) values: the kernel must still output 0 there.
    """
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = int(cu_q_lens[-1]) + num_padding_rows
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim))
    return jnp.asarray(q, dtype), jnp.asarray(cu_q_lens)


def naive_attention(q, k, v, *, sm_scale: float, q_positions):
    """Dense causal GQA attention in float64 on contiguous KV, one request.

    q: [Tq, Hq, D]; k, v: [S, Hkv, D]; query t sees keys at positions <= q_positions[t].
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    logits = np.einsum("thd,shd->hts", q, k) * sm_scale
    visible = np.arange(k.shape[0])[None, :] <= np.asarray(q_positions)[:, None]  # [Tq, S]
    logits = np.where(visible[None], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", weights, v)


def relative_error(actual, expected) -> float:
    """Normwise error max|actual - expected| / max|expected| in float64 (NaN if actual has NaN)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(actual - expected).max(initial=0.0)) / scale
