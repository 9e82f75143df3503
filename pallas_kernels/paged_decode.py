"""Paged decode attention (one query token per request, GQA), split-K over the context.

Request b's query token sits at position kv_len - 1 (its K/V already in the cache) and attends to
the positions < kv_len; kv_len 0 marks a padding row, whose output is 0.

Work split (flash-decoding): the grid is (request, kv_head, split). A program takes all G query
heads of its KV head as the rows of one [max(16, pow2(G)), D] query tile, so each K/V tile is loaded
once per KV head, and walks one partition of the request's context. Partitions are sized from the
request's own kv_len (about kv_len / num_splits, at least min_split_tokens, a multiple of block_kv),
so a few long requests still spread over batch x kv_heads x splits programs. Each program writes its
partition's normalized output and base-2 log-sum-exp; `_combine_splits` merges them in XLA (math in
docs/kernels.md). Empty partitions write output 0 and lse -inf. With one split the kernel's output
is final and the combine is skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common
from pallas_kernels.block_sizes import DecodeBlockSizes, decode_block_sizes, decode_num_splits

# Triton's dot needs at least 16 rows; smaller query-head groups are padded (masked) up to this.
_MIN_BLOCK_M = 16


def paged_decode_reference(q, k_cache, v_cache, block_tables, kv_lens, *, sm_scale):
    """Pure-jnp paged decode attention, same contract as `paged_decode_attention`."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]  # head-major cache [num_blocks, Hkv, block_size, D]
    k = _common.gather_kv(k_cache, block_tables, kv_lens)  # [B, Hkv, S, D]
    v = _common.gather_kv(v_cache, block_tables, kv_lens)
    visible = jnp.arange(k.shape[2])[None, :] < kv_lens[:, None]  # [B, S]
    # Query heads are kv-major: head h * G + g belongs to KV head h.
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bkgd,bksd->bkgs", qg, k, precision=lax.Precision.HIGHEST) * sm_scale
    probs = _common.masked_softmax(logits, visible[:, None, None, :])
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v, precision=lax.Precision.HIGHEST)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


def _paged_decode_kernel(
    kv_lens_ref,  # [B] int32
    block_tables_ref,  # [B, max_blocks] int32
    q_ref,  # [G, D]  the query heads of this (request, KV head)
    k_cache_ref,  # [num_blocks, block_size, D]  this KV head (axis 1 of the cache, squeezed)
    v_cache_ref,  # [num_blocks, block_size, D]
    *rest,  # [o_init_ref, lse_init_ref (aliased, tests only),] o_ref [G, D], lse_ref [G]
    sm_scale: float,
    block_m: int,
    block_kv: int,
    num_splits: int,
    min_split_tokens: int,
):
    o_ref, lse_ref = rest[-2:]
    group, head_dim = q_ref.shape
    block_size = k_cache_ref.shape[1]
    request = pl.program_id(0)
    split = pl.program_id(2)
    kv_len = kv_lens_ref[request]

    # This program's partition [start, end) of the request's context.
    split_len = jnp.maximum(_common.cdiv(kv_len, num_splits), min_split_tokens)
    split_len = _common.cdiv(split_len, block_kv) * block_kv
    start = split * split_len
    end = jnp.minimum(start + split_len, kv_len)
    num_kv_tiles = _common.cdiv(jnp.maximum(end - start, 0), block_kv)

    head = jnp.arange(block_m, dtype=jnp.int32)
    head_valid = head < group
    q_index = _common.rows_index(head, head_dim=head_dim)
    q = _common.load_rows(q_ref, q_index, head_valid)  # [M, D]
    scale = sm_scale * _common.LOG2E
    kv_offsets = jnp.arange(block_kv, dtype=jnp.int32)

    def step(kv_tile, carry):
        positions = start + kv_tile * block_kv + kv_offsets  # [N]
        kv_valid = positions < end
        kv_index = _common.kv_tile_index(
            block_tables_ref, request, positions, block_size=block_size, head_dim=head_dim
        )
        k = _common.load_rows(k_cache_ref, kv_index, kv_valid)  # [N, D]
        scores = jnp.where(kv_valid[None, :], _common.dot_nt(q, k) * scale, -jnp.inf)  # [M, N]
        v = _common.load_rows(v_cache_ref, kv_index, kv_valid)  # [N, D]
        return _common.online_softmax_step(carry, scores, v, masked=True)

    acc, row_max, denom = lax.fori_loop(0, num_kv_tiles, step, _common.init_softmax_carry(block_m, head_dim))
    has_keys = denom > 0.0
    safe_denom = jnp.where(has_keys, denom, 1.0)
    out = acc / safe_denom[:, None]
    lse = jnp.where(has_keys, row_max + jnp.log2(safe_denom), -jnp.inf)  # base 2
    _common.store_rows(o_ref, q_index, out, head_valid)
    plgpu.store(lse_ref.at[head], lse, mask=head_valid)


def _combine_splits(o_parts, lse_parts):
    """Merges partitions: out = sum_s 2^(lse_s - LSE) o_s, LSE = log2 sum_s 2^lse_s.

    o_parts [B, S, Hkv, G, D] float32 normalized partial outputs; lse_parts [B, S, Hkv, G] base 2,
    -inf for empty partitions. Rows whose partitions are all empty come out 0.
    """
    lse_max = lse_parts.max(axis=1, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp2(lse_parts - lse_max)  # [B, S, Hkv, G]; 0 for empty partitions
    denom = weights.sum(axis=1)
    out = (weights[..., None] * o_parts).sum(axis=1)
    return out / jnp.where(denom == 0.0, 1.0, denom)[..., None]


def _paged_decode_call(
    q,
    k_cache,
    v_cache,
    block_tables,
    kv_lens,
    *,
    sm_scale: float,
    block_sizes: DecodeBlockSizes,
    num_splits: int,
    interpret: bool,
    poison_output: bool = False,
):
    """Builds the grid and BlockSpecs, runs the kernel and combines the partitions.

    poison_output (tests only): the partial-output buffers start as NaN through
    input_output_aliases, so anything the kernel fails to write reaches the result as NaN.
    """
    batch, num_q_heads, head_dim = q.shape
    num_blocks, num_kv_heads, block_size, _ = k_cache.shape  # head-major
    group = num_q_heads // num_kv_heads
    block_m = max(_MIN_BLOCK_M, _common.next_power_of_2(group))
    # With one partition the kernel's output is final: keep q's dtype and skip the combine.
    part_dtype = q.dtype if num_splits == 1 else jnp.float32

    q_grouped = q.reshape(batch, num_kv_heads, group, head_dim)  # free: heads are kv-major
    sq = _common.SQUEEZED
    q_spec = pl.BlockSpec((sq, sq, group, head_dim), lambda b, h, s: (b, h, 0, 0))
    # Program (b, h, s) sees KV head h of every block: [num_blocks, block_size, D], each block's rows
    # one contiguous tile of the head-major pool; the block table picks blocks inside the kernel.
    cache_spec = pl.BlockSpec((num_blocks, sq, block_size, head_dim), lambda b, h, s: (0, h, 0, 0))
    o_spec = pl.BlockSpec((sq, sq, sq, group, head_dim), lambda b, h, s: (b, s, h, 0, 0))
    lse_spec = pl.BlockSpec((sq, sq, sq, group), lambda b, h, s: (b, s, h, 0))
    o_shape = (batch, num_splits, num_kv_heads, group, head_dim)
    lse_shape = (batch, num_splits, num_kv_heads, group)
    in_specs = [
        pl.BlockSpec(kv_lens.shape, lambda b, h, s: (0,)),
        pl.BlockSpec(block_tables.shape, lambda b, h, s: (0, 0)),
        q_spec,
        cache_spec,
        cache_spec,
    ]
    args = [kv_lens, block_tables, q_grouped, k_cache, v_cache]
    aliases = {}
    if poison_output:
        in_specs += [o_spec, lse_spec]
        args += [jnp.full(o_shape, jnp.nan, part_dtype), jnp.full(lse_shape, jnp.nan, jnp.float32)]
        aliases = {len(args) - 2: 0, len(args) - 1: 1}

    kernel = functools.partial(
        _paged_decode_kernel,
        sm_scale=sm_scale,
        block_m=block_m,
        block_kv=block_sizes.block_kv,
        num_splits=num_splits,
        min_split_tokens=block_sizes.min_split_tokens,
    )
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=[o_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(o_shape, part_dtype), jax.ShapeDtypeStruct(lse_shape, jnp.float32)],
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_common.compiler_params(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        name=f"paged_decode_kv{block_sizes.block_kv}_s{num_splits}",
    )(*args)
    out = o_parts[:, 0] if num_splits == 1 else _combine_splits(o_parts, lse_parts)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_sizes", "num_splits"))
def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    kv_lens,
    *,
    sm_scale: float,
    interpret: bool | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    num_splits: int | None = None,
):
    """GQA attention of one new token per request over its paged KV cache, split-K.

    Args:
      q: [B, Hq, D], one query token per request.
      k_cache, v_cache: [num_blocks, Hkv, block_size, D] (head-major), holding the token's own K/V
        at kv_len - 1; physical block 0 is the null block.
      block_tables: [B, max_blocks] int32; entries past a request's used blocks are never read.
      kv_lens: [B] int32; the token attends to positions < kv_len; 0 marks a padding row
        (kv_len <= max_blocks * block_size; not checked, values are traced).
      sm_scale: softmax scale, a static Python float.
      interpret: None = interpret mode on CPU, compiled Triton otherwise.
      block_sizes: overrides the table in `pallas_kernels.block_sizes`.
      num_splits: overrides the split-K heuristic `block_sizes.decode_num_splits`.

    Returns:
      [B, Hq, D] in q's dtype, accumulated in float32; padding rows are 0.
    """
    sm_scale = _common.check_sm_scale(sm_scale)
    _common.check_q_and_cache(q, k_cache, v_cache, block_tables)
    _common.check_rank("kv_lens", kv_lens, 1)
    _common.check_int32("kv_lens", kv_lens)
    batch = q.shape[0]
    if batch == 0:
        raise ValueError(f"need at least one request, got {q.shape=}")
    if kv_lens.shape[0] != batch or block_tables.shape[0] != batch:
        shapes = f"{q.shape=}, {kv_lens.shape=}, {block_tables.shape=}"
        raise ValueError(f"q, kv_lens, block_tables must agree on B: {shapes}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits=}")
    if block_sizes is None:
        block_sizes = decode_block_sizes(head_dim=q.shape[2], dtype=q.dtype)
    if num_splits is None:
        num_splits = decode_num_splits(
            batch=batch,
            num_kv_heads=k_cache.shape[1],
            max_context=block_tables.shape[1] * k_cache.shape[2],
            sizes=block_sizes,
        )
    return _paged_decode_call(
        q,
        k_cache,
        v_cache,
        block_tables,
        kv_lens,
        sm_scale=sm_scale,
        block_sizes=block_sizes,
        num_splits=num_splits,
        interpret=_common.resolve_interpret(interpret),
    )
