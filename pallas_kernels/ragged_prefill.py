"""Ragged paged prefill attention (causal, GQA) over the head-major paged KV cache
`[num_blocks, num_kv_heads, block_size, head_dim]` (layout and null block: `_common`'s module doc).

Queries of all requests are packed into one `[T, Hq, D]` array; request b owns rows
`cu_q_lens[b]:cu_q_lens[b+1]`, and its KV (cached prefix + the new tokens, already written to the
cache) lives in the blocks of `block_tables[b]`. Query i of a request with q_len queries and kv_len
keys sits at position kv_len - q_len + i and sees the keys at positions <= that (the causal mask
aligned bottom-right). Rows at or after cu_q_lens[B] are padding and get zeros.

Work split: a *tile* is up to block_q consecutive query tokens of one request, and the grid is
(tile, kv_head). A program takes its tile's tokens times all G = Hq // Hkv query heads of its KV head
as the rows of one [block_m, D] query tile ("head packing"): each K/V tile is loaded once for the
G heads that share it. A small int32 table built in XLA before the kernel (`_tile_table`) tells each
program its request and rows. The grid is static, cdiv(T, block_q) + B tiles: request b needs
cdiv(q_len_b, block_q) of them, so at most B partial tiles are lost to raggedness, and the tiles
left over cover the padding rows and write their zeros.

Inside a program the KV loop runs in two parts: key tiles every query row of the tile may see in
full (no mask, no predicated loads), then the tiles along the diagonal (causal and length masks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels.block_sizes import PrefillBlockSizes, prefill_block_sizes

# Columns of the per-tile table: request (block-table row), first and one-past-last packed query row,
# position of the tile's first query token, the request's kv_len (0 for padding tiles).
_REQUEST, _ROW_START, _ROW_END, _FIRST_Q_POS, _KV_LEN = range(5)


def ragged_prefill_reference(q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens, *, sm_scale):
    """Pure-jnp ragged paged prefill attention, same contract as `ragged_prefill_attention`.

    Used by the tests and fit for small shapes only: it gathers each query row's request KV,
    a [T, Hkv, max_blocks * block_size, D] float32 array.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    batch = kv_lens.shape[0]
    num_kv_heads = k_cache.shape[1]  # head-major cache [num_blocks, Hkv, block_size, D]
    k = _common.gather_kv(k_cache, block_tables, kv_lens)  # [B, Hkv, S, D]
    v = _common.gather_kv(v_cache, block_tables, kv_lens)

    row = jnp.arange(num_tokens)
    request = jnp.clip(jnp.searchsorted(cu_q_lens[1:], row, side="right"), 0, batch - 1)  # [T]
    q_len = cu_q_lens[request + 1] - cu_q_lens[request]
    q_pos = kv_lens[request] - q_len + (row - cu_q_lens[request])  # [T]
    is_query = row < cu_q_lens[batch]
    visible = (jnp.arange(k.shape[2])[None, :] <= q_pos[:, None]) & is_query[:, None]  # [T, S]

    # Query heads are kv-major: head h * G + g belongs to KV head h.
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    k_rows, v_rows = k[request], v[request]  # [T, Hkv, S, D]
    logits = jnp.einsum("tkgd,tksd->tkgs", qg, k_rows, precision=lax.Precision.HIGHEST) * sm_scale
    probs = _common.masked_softmax(logits, visible[:, None, None, :])
    out = jnp.einsum("tkgs,tksd->tkgd", probs, v_rows, precision=lax.Precision.HIGHEST)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


def _ragged_prefill_kernel(
    tile_table_ref,  # [num_tiles, 5] int32, columns _REQUEST.._KV_LEN
    block_tables_ref,  # [B, max_blocks] int32
    q_ref,  # [T, G, D]  the query heads of this program's KV head
    k_cache_ref,  # [num_blocks, block_size, D]  this KV head (axis 1 of the cache, squeezed)
    v_cache_ref,  # [num_blocks, block_size, D]
    *rest,  # [out_init_ref [T, G, D] (aliased to o_ref, tests only),] o_ref [T, G, D]
    sm_scale: float,
    block_q: int,
    group_pad: int,
    block_kv: int,
):
    o_ref = rest[-1]
    _, group, head_dim = q_ref.shape
    block_size = k_cache_ref.shape[1]
    block_m = block_q * group_pad
    tile = pl.program_id(0)
    request = tile_table_ref[tile, _REQUEST]
    row_start = tile_table_ref[tile, _ROW_START]
    row_end = tile_table_ref[tile, _ROW_END]
    first_q_pos = tile_table_ref[tile, _FIRST_Q_POS]
    kv_len = tile_table_ref[tile, _KV_LEN]

    # Row m of the query tile is packed row row_start + m // group_pad, query head m % group_pad.
    m = jnp.arange(block_m, dtype=jnp.int32)
    token_in_tile = m // group_pad
    head = m % group_pad
    row = row_start + token_in_tile
    row_valid = row < row_end
    if group_pad != group:
        row_valid &= head < group
    q_index = _common.rows_index(row, head, head_dim=head_dim)
    q = _common.load_rows(q_ref, q_index, row_valid)  # [M, D]
    q_pos = first_q_pos + token_in_tile  # [M]

    # Keys [0, first_q_pos] are visible to every query of the tile: those KV tiles need no mask.
    num_queries = jnp.minimum(row_end - row_start, block_q)
    kv_end = jnp.minimum(first_q_pos + num_queries, kv_len)  # one past the last key any query sees
    num_kv_tiles = _common.cdiv(jnp.maximum(kv_end, 0), block_kv)
    num_unmasked = jnp.minimum(jnp.maximum(first_q_pos + 1, 0) // block_kv, num_kv_tiles)
    scale = sm_scale * _common.LOG2E
    kv_offsets = jnp.arange(block_kv, dtype=jnp.int32)

    def step(kv_tile, carry, *, masked: bool):
        positions = kv_tile * block_kv + kv_offsets  # [N]
        kv_valid = positions < kv_end if masked else None
        kv_index = _common.kv_tile_index(
            block_tables_ref, request, positions, block_size=block_size, head_dim=head_dim
        )
        k = _common.load_rows(k_cache_ref, kv_index, kv_valid)  # [N, D]
        scores = _common.dot_nt(q, k) * scale  # [M, N]
        if masked:
            visible = (positions[None, :] <= q_pos[:, None]) & kv_valid[None, :]
            scores = jnp.where(visible, scores, -jnp.inf)
        v = _common.load_rows(v_cache_ref, kv_index, kv_valid)  # [N, D]
        return _common.online_softmax_step(carry, scores, v, masked=masked)

    carry = _common.init_softmax_carry(block_m, head_dim)
    carry = lax.fori_loop(0, num_unmasked, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(num_unmasked, num_kv_tiles, functools.partial(step, masked=True), carry)
    acc, _, denom = carry
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[:, None]  # rows without keys stay 0
    _common.store_rows(o_ref, q_index, out, row_valid)


def _tile_table(cu_q_lens, kv_lens, *, num_tokens: int, block_q: int):
    """The per-tile table, [cdiv(T, block_q) + B, 5] int32 (columns _REQUEST.._KV_LEN).

    Request b gets cdiv(q_len_b, block_q) consecutive tiles. The tiles after the last request's are
    padding tiles: block_q rows each from cu_q_lens[B] on, kv_len 0, so they only write zeros.
    """
    batch = kv_lens.shape[0]
    num_tiles = _common.cdiv(num_tokens, block_q) + batch
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [B]
    tiles_per_request = _common.cdiv(q_lens, block_q)
    tile_ends = jnp.cumsum(tiles_per_request)  # [B]
    tile_starts = tile_ends - tiles_per_request
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    request = jnp.searchsorted(tile_ends, tile, side="right").astype(jnp.int32)  # B on padding tiles
    is_padding = request >= batch
    request = jnp.minimum(request, batch - 1)
    local_tile = tile - tile_starts[request]
    padding_start = cu_q_lens[batch] + (tile - tile_ends[batch - 1]) * block_q
    row_start = jnp.where(is_padding, padding_start, cu_q_lens[request] + local_tile * block_q)
    row_end = jnp.where(is_padding, num_tokens, cu_q_lens[request + 1])
    kv_len = jnp.where(is_padding, 0, kv_lens[request])
    first_q_pos = jnp.where(is_padding, 0, kv_len - q_lens[request] + local_tile * block_q)
    request = jnp.where(is_padding, 0, request)
    return jnp.stack([request, row_start, row_end, first_q_pos, kv_len], axis=1).astype(jnp.int32)


def _ragged_prefill_call(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_q_lens,
    kv_lens,
    *,
    sm_scale: float,
    block_sizes: PrefillBlockSizes,
    interpret: bool,
    poison_output: bool = False,
):
    """Builds the grid and BlockSpecs and runs the kernel (inputs already validated).

    poison_output (tests only): the output buffer starts as NaN through input_output_aliases, so
    any row the kernel fails to write comes back NaN.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, num_kv_heads, block_size, _ = k_cache.shape  # head-major
    group = num_q_heads // num_kv_heads
    group_pad = _common.next_power_of_2(group)
    block_q = max(1, block_sizes.block_m // group_pad)
    tile_table = _tile_table(cu_q_lens, kv_lens, num_tokens=num_tokens, block_q=block_q)

    q_grouped = q.reshape(num_tokens, num_kv_heads, group, head_dim)  # free: heads are kv-major
    sq = _common.SQUEEZED
    group_spec = pl.BlockSpec((num_tokens, sq, group, head_dim), lambda t, h: (0, h, 0, 0))
    # Program (t, h) sees KV head h of every block: [num_blocks, block_size, D], each block's rows
    # one contiguous tile of the head-major pool; the block table picks blocks inside the kernel.
    cache_spec = pl.BlockSpec((num_blocks, sq, block_size, head_dim), lambda t, h: (0, h, 0, 0))
    in_specs = [
        pl.BlockSpec(tile_table.shape, lambda t, h: (0, 0)),
        pl.BlockSpec(block_tables.shape, lambda t, h: (0, 0)),
        group_spec,
        cache_spec,
        cache_spec,
    ]
    args = [tile_table, block_tables, q_grouped, k_cache, v_cache]
    aliases = {}
    if poison_output:
        in_specs.append(group_spec)
        args.append(jnp.full(q_grouped.shape, jnp.nan, q.dtype))
        aliases = {len(args) - 1: 0}

    kernel = functools.partial(
        _ragged_prefill_kernel,
        sm_scale=sm_scale,
        block_q=block_q,
        group_pad=group_pad,
        block_kv=block_sizes.block_kv,
    )
    out = pl.pallas_call(
        kernel,
        grid=(tile_table.shape[0], num_kv_heads),
        in_specs=in_specs,
        out_specs=group_spec,
        out_shape=jax.ShapeDtypeStruct(q_grouped.shape, q.dtype),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_common.compiler_params(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        name=f"ragged_prefill_m{block_sizes.block_m}_kv{block_sizes.block_kv}",
    )(*args)
    return out.reshape(num_tokens, num_q_heads, head_dim)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_sizes"))
def ragged_prefill_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_q_lens,
    kv_lens,
    *,
    sm_scale: float,
    interpret: bool | None = None,
    block_sizes: PrefillBlockSizes | None = None,
):
    """Causal GQA attention of packed ragged queries over the paged KV cache.

    Args:
      q: [T, Hq, D] packed queries; request b's are rows cu_q_lens[b]:cu_q_lens[b+1].
      k_cache, v_cache: [num_blocks, Hkv, block_size, D] (head-major), already holding the new
        tokens' K/V; physical block 0 is the null block.
      block_tables: [B, max_blocks] int32; entries past a request's used blocks are never read.
      cu_q_lens: [B + 1] int32, nondecreasing, cu_q_lens[0] == 0; rows >= cu_q_lens[B] are padding.
      kv_lens: [B] int32, each request's KV length including its new tokens (kv_len >= q_len,
        kv_len <= max_blocks * block_size; not checked, values are traced).
      sm_scale: softmax scale, a static Python float.
      interpret: None = interpret mode on CPU, compiled Triton otherwise.
      block_sizes: overrides the table in `pallas_kernels.block_sizes`.

    Returns:
      [T, Hq, D] in q's dtype, accumulated in float32; padding rows are 0.
    """
    sm_scale = _common.check_sm_scale(sm_scale)
    _common.check_q_and_cache(q, k_cache, v_cache, block_tables)
    _common.check_rank("cu_q_lens", cu_q_lens, 1)
    _common.check_rank("kv_lens", kv_lens, 1)
    _common.check_int32("cu_q_lens", cu_q_lens)
    _common.check_int32("kv_lens", kv_lens)
    batch = kv_lens.shape[0]
    if batch == 0:
        raise ValueError(f"need at least one request, got {kv_lens.shape=}")
    if cu_q_lens.shape[0] != batch + 1:
        raise ValueError(f"cu_q_lens must have B + 1 entries, got {cu_q_lens.shape=} with {kv_lens.shape=}")
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must have B rows, got {block_tables.shape=} with {kv_lens.shape=}")
    if q.shape[0] == 0:
        raise ValueError(f"q has no rows: {q.shape=}")
    if block_sizes is None:
        block_sizes = prefill_block_sizes(head_dim=q.shape[2], dtype=q.dtype)
    return _ragged_prefill_call(
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_q_lens,
        kv_lens,
        sm_scale=sm_scale,
        block_sizes=block_sizes,
        interpret=_common.resolve_interpret(interpret),
    )
