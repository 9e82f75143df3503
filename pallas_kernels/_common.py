"""Pieces shared by the paged attention kernels.

* JAX-version shims for the Pallas Triton API (names moved between JAX releases).
* Input validation shared by both entry points; every error names the offending values.
* In-kernel tile loads through the block table, written once so both kernels gather KV the same way.
* The online-softmax step of both kernels and the masked softmax of both jnp references.

Cache layout (the engine's contract, see docs/kernels.md): per layer `k_cache` and `v_cache` are each
HEAD-MAJOR `[num_blocks, num_kv_heads, block_size, head_dim]`; logical position `p` of request `b`
lives in physical block `block_tables[b, p // block_size]`, row `p % block_size`, of every KV head.
Each (block, head) pair is one contiguous `[block_size, head_dim]` tile, so a kernel program that
owns one KV head (its BlockSpec selects head h on axis 1) sees a `[num_blocks, block_size, head_dim]`
view whose block rows are contiguous, and a reference gathers per-head key sequences with one
transpose of the block axis past the head axis. Physical block 0 is the null block: table entries
past a request's used blocks point at it, and no kernel or reference may let its values through.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# `pl.squeezed` is the spelling since JAX 0.6; older releases used `None` in block shapes.
SQUEEZED = getattr(pl, "squeezed", None)
# `plgpu.CompilerParams` was called `TritonCompilerParams` before JAX 0.7.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def compiler_params(*, num_warps: int, num_stages: int):
    """Triton compiler parameters for `pl.pallas_call`, whatever this JAX version calls them."""
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret on CPU (no Triton there), compile for the GPU otherwise."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a, b):
    """Ceiling division of Python ints or non-negative traced int32 values."""
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------------------
# Validation. Trace time: shapes and dtypes only; the values of lengths cannot be checked under jit.
# --------------------------------------------------------------------------------------------------


def check_rank(name: str, x, rank: int) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got {name}.shape={tuple(x.shape)}")


def check_int32(name: str, x) -> None:
    if x.dtype != jnp.int32:
        raise ValueError(f"{name} must be int32, got {name}.dtype={x.dtype}")


def check_q_and_cache(q, k_cache, v_cache, block_tables) -> tuple[int, int, int]:
    """Checks what both kernels share; returns (num_q_heads, num_kv_heads, head_dim)."""
    check_rank("q", q, 3)
    check_rank("k_cache", k_cache, 4)
    check_rank("v_cache", v_cache, 4)
    check_rank("block_tables", block_tables, 2)
    check_int32("block_tables", block_tables)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {k_cache.shape=}, {v_cache.shape=}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype=}, {k_cache.dtype=}, {v_cache.dtype=}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{q.dtype=} is not supported; use float32 or bfloat16")
    _, num_q_heads, head_dim = q.shape
    # Head-major: the KV heads are axis 1, the rows of a block axis 2 (see the module doc).
    num_blocks, num_kv_heads, block_size, cache_head_dim = k_cache.shape
    if head_dim != cache_head_dim:
        raise ValueError(f"q's {head_dim=} does not match the cache's head_dim={cache_head_dim}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{head_dim=} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"{num_q_heads=} must be divisible by {num_kv_heads=} (axis 1 of the head-major cache "
            f"[num_blocks, num_kv_heads, block_size, head_dim], got {k_cache.shape=})"
        )
    if num_blocks == 0 or block_size == 0:
        raise ValueError(f"the cache holds no slots: {num_blocks=}, {block_size=}")
    if block_tables.shape[1] == 0:
        raise ValueError(f"block_tables has no columns: {block_tables.shape=}")
    return num_q_heads, num_kv_heads, head_dim


def check_sm_scale(sm_scale) -> float:
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise ValueError(f"sm_scale must be a real number (it is a static argument), got {sm_scale=}")
    if not math.isfinite(sm_scale) or sm_scale <= 0:
        raise ValueError(f"sm_scale must be finite and positive, got {sm_scale=}")
    return float(sm_scale)


# --------------------------------------------------------------------------------------------------
# In-kernel loads. Every load goes through explicit index arrays: Triton turns them into one pointer
# tensor and a masked load (masked lanes issue no memory access), the interpreter into a gather.
# (Mixing array indices with slices lowers for Triton but does not run in interpret mode.)
# --------------------------------------------------------------------------------------------------


def kv_tile_index(block_tables_ref, request, positions, *, block_size: int, head_dim: int):
    """Index arrays addressing the KV rows at logical `positions` of `request`.

    block_tables_ref: [batch, max_blocks] int32
    request:          scalar int32, the row of the block table
    positions:        [N] int32 logical token positions, >= 0
    returns           (block, row, dim), each [N, head_dim], into a [num_blocks, block_size, head_dim] ref:
                      one KV head of the head-major cache, whose BlockSpec squeezed out axis 1, so
                      consecutive positions of one block address consecutive head_dim-wide rows

    The block-table read is clamped in bounds, so positions past the table are safe provided their
    cache loads are masked. Compute once per KV tile; K and V share it.
    """
    max_blocks = block_tables_ref.shape[1]
    logical_block = jnp.minimum(positions // block_size, max_blocks - 1)
    physical_block = block_tables_ref[request, logical_block]  # [N]
    shape = (positions.shape[0], head_dim)
    return (
        jnp.broadcast_to(physical_block[:, None], shape),
        jnp.broadcast_to((positions % block_size)[:, None], shape),
        jnp.broadcast_to(jnp.arange(head_dim, dtype=jnp.int32)[None, :], shape),
    )


def rows_index(*indices, head_dim: int):
    """Index arrays [M, head_dim] addressing (*indices[.][m], :) of a [..., D] ref; each index is [M]."""
    shape = (indices[0].shape[0], head_dim)
    dims = jnp.broadcast_to(jnp.arange(head_dim, dtype=jnp.int32)[None, :], shape)
    return tuple(jnp.broadcast_to(index[:, None], shape) for index in indices) + (dims,)


def load_rows(ref, index, valid):
    """ref[index] for [N, D] index arrays; rows where `valid` ([N] bool, None = all) is False are
    not read and load as 0."""
    if valid is None:
        return plgpu.load(ref.at[index])
    mask = jnp.broadcast_to(valid[:, None], index[0].shape)
    return plgpu.load(ref.at[index], mask=mask, other=0)


def store_rows(ref, index, value, valid):
    """ref[index] = value for [N, D] index arrays, skipping rows where `valid` ([N] bool) is False."""
    mask = jnp.broadcast_to(valid[:, None], index[0].shape)
    plgpu.store(ref.at[index], value.astype(ref.dtype), mask=mask)


def dot_nt(a, b):
    """a @ b.T accumulated in float32: [M, K] x [N, K] -> [M, N]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a @ b accumulated in float32: [M, K] x [K, N] -> [M, N]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def init_softmax_carry(block_m: int, head_dim: int):
    """(acc [M, D], running max m [M], running sum l [M]) before the first KV tile."""
    return (
        jnp.zeros((block_m, head_dim), jnp.float32),
        jnp.full((block_m,), -jnp.inf, jnp.float32),
        jnp.zeros((block_m,), jnp.float32),
    )


def online_softmax_step(carry, scores, v, *, masked: bool):
    """One flash-attention update, in base 2.

    carry:  (acc [M, D] f32, m [M] f32 running max of scores, l [M] f32 running sum of 2^(s - m))
    scores: [M, N] f32, already times sm_scale * log2(e); -inf where masked
    v:      [N, D]
    A row that has seen only masked keys keeps m = -inf, l = 0, acc = 0 (no NaN): with `masked`,
    the max is replaced by 0 for such rows before it is subtracted.
    """
    acc, m_prev, l_prev = carry
    m_next = jnp.maximum(m_prev, scores.max(axis=1))
    m_sub = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
    alpha = jnp.exp2(m_prev - m_sub)  # 0 on the first tile, where m_prev = -inf
    p = jnp.exp2(scores - m_sub[:, None])  # [M, N]
    l_next = alpha * l_prev + p.sum(axis=1)
    acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
    return acc, m_next, l_next


# --------------------------------------------------------------------------------------------------
# Reference helpers (plain jnp, XLA).
# --------------------------------------------------------------------------------------------------


def gather_kv(cache, block_tables, kv_lens):
    """Contiguous float32 KV per request and KV head through the block table, zero at positions >= kv_len.

    cache [num_blocks, Hkv, block_size, D] (head-major), block_tables [B, max_blocks], kv_lens [B]
    -> [B, Hkv, max_blocks * block_size, D]: for each request and KV head, its keys in logical order.
    """
    batch, max_blocks = block_tables.shape
    _, num_kv_heads, block_size, head_dim = cache.shape
    gathered = cache[block_tables]  # [B, max_blocks, Hkv, block_size, D]
    # Move the head axis before the block axis; then (block, row) flatten to the logical position.
    gathered = gathered.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, max_blocks * block_size, head_dim)
    in_range = jnp.arange(max_blocks * block_size)[None, :] < kv_lens[:, None]  # [B, S]
    # `where`, not a multiply, so NaN garbage in unwritten slots cannot leak into the result.
    return jnp.where(in_range[:, None, :, None], gathered.astype(jnp.float32), 0.0)


def masked_softmax(logits, mask):
    """Softmax over the last axis restricted to `mask`; rows with no visible key are all zeros."""
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = logits.max(axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = weights.sum(axis=-1, keepdims=True)
    return weights / jnp.where(denom == 0.0, 1.0, denom)
