"""The attention seam between the model and the kernels, and the per-step metadata it reads.

KV cache layout (one pair of arrays per layer; see dsjax/runtime/kv_cache.py for the pool):

    k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]   (head-major blocks)

Each (block, head) is one contiguous [block_size, head_dim] tile: a gathered block feeds the
per-head dots as it lies (no transpose), a kernel loads a head's tile as one 2-D slab, and under
tensor parallelism axis 1 splits over the "tp" axis. A request's token at logical position p lives
in physical block ``block_tables[b, p // block_size]``, row ``p % block_size`` of every head. Block 0 is the *null block*: the block manager never hands it out, padding
tokens write their K/V there, and padding entries of a block table point at it, so every index the
programs compute is in bounds and no real block is ever clobbered by padding.

Worked example (block_size 4): a request with 6 cached tokens and block table [7, 3, 0, 0] keeps
positions 0-3 in block 7 and positions 4-5 in rows 0-1 of block 3; its next token (position 6)
goes to slot 3 * 4 + 2 = 14 of the flattened [num_blocks * block_size] view.

The metadata is an explicit pytree argument of the jitted programs (never a global). Prefill packs
the prompts of a batch along one token axis (request b owns rows cu_q_lens[b]:cu_q_lens[b+1]);
decode has exactly one token per request. The type of the metadata, not a mode string, selects the
attention routine.

Mixed batches (a chunked-prefill step: running decodes as one-token chunks plus prompt chunks) run
through the prefill program with `PrefillMeta.num_decode_rows = Bd > 0`, a static split of the
packed batch into two regions, the way vLLM / FlashInfer split the decode and prefill tokens of one
forward pass:

- decode region: requests 0..Bd-1 and packed rows 0..Bd-1; request i owns exactly row i
  (cu_q_lens[i] == i), its one query sits at position kv_lens[i] - 1;
- prefill region: requests Bd..B-1, packed from row Bd on exactly like a plain prefill batch.

Worked example (Bd = 4): two decodes at positions 9 and 5, two padding decode requests, then the
first 6-token chunk of a prompt (B = 5 requests, T = 4 + 16 packed rows, see dsjax/engine/shapes.py):

    row          0   1   2   3 | 4  5  6  7  8  9 | 10 .. 19
    request      0   1   2p  3p| 4  4  4  4  4  4 | padding rows
    positions    9   5   0   0 | 0  1  2  3  4  5 | 0 ..
    cu_q_lens    [0, 1, 2, 3, 4, 10]    kv_lens [10, 6, 1, 1, 6]

The prefill region seen on its own: rows 4..19 as rows 0..15, cu_q_lens [0, 6], kv_lens [6].

Padding decode requests (2p, 3p) have q_len 1, position 0, slot 0 and an all-zero block-table row:
they attend row 0 of the null block, which the step's padding tokens have just written, so their
(unused) output is finite. The jnp path attends the decode region with the decode formulation
(B_d * S scores) and only the prefill region with a prefill formulation, instead of padding every
decode to a prefill request; the split is also a valid ragged description, so the Pallas kernel
reads the same metadata unchanged.

Sliding-window attention (Mistral): with a static `sliding_window` W, the query at position p
attends keys p - W < k <= p (W keys, itself included), as Hugging Face masks it. Only the jnp
paths implement it: blocks older than the window stay allocated and are masked (decode skips
the block-table columns before every live request's window); `attend` refuses backend
"pallas" and takes the jnp path for "auto".
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

Backend = Literal["xla", "pallas", "auto"]
BACKENDS = ("xla", "pallas", "auto")
# "auto" on CPU: the score count above which a prefill shape runs the ragged Pallas kernel
# (interpret mode) instead of the jnp path. Measured on this 2-core CPU (small-llama heads):
# one 512-token prompt jnp 30 ms / kernel 49 ms; one 1024-token prompt 197 / 87 ms; a 1024-token
# batch of 564 + 150 + 101 tokens 636 / 78 ms. Decode always takes the jnp path on CPU (the
# split-K kernel interpreted is ~100x slower there).
AUTO_PREFILL_KERNEL_SCORES = 512 * 512


@struct.dataclass
class PrefillMeta:
    positions: jax.Array  # [T] int32 logical position of each packed token (0 for padding)
    slots: jax.Array  # [T] int32 flat cache slot (block * block_size + row); padding -> null block
    block_tables: jax.Array  # [B, max_blocks] int32
    cu_q_lens: jax.Array  # [B + 1] int32, cu_q_lens[0] == 0; rows >= cu_q_lens[B] are padding
    kv_lens: jax.Array  # [B] int32 cached prefix + new tokens; 0 for padding requests
    # Static: the first num_decode_rows requests own one row each, rows 0..num_decode_rows-1 (the
    # decode region of a mixed batch, see the module docstring); 0 = a plain prefill batch.
    num_decode_rows: int = struct.field(pytree_node=False, default=0)
    # Static: no request has a cached prefix (every chunk starts at position 0) and there is no
    # decode region, so each request's keys are exactly its own packed rows of this step and the
    # jnp path attends the step's K/V directly (T x T scores, no gather; see `_prefill_fresh`).
    fresh: bool = struct.field(pytree_node=False, default=False)

    def split(self) -> tuple[DecodeMeta, PrefillMeta]:
        """(decode region, prefill region) of a mixed batch; the prefill region's rows start at 0."""
        bd = self.num_decode_rows
        decode = DecodeMeta(positions=self.positions[:bd], slots=self.slots[:bd], block_tables=self.block_tables[:bd],
                            kv_lens=self.kv_lens[:bd])
        prefill = PrefillMeta(positions=self.positions[bd:], slots=self.slots[bd:], block_tables=self.block_tables[bd:],
                              cu_q_lens=self.cu_q_lens[bd:] - bd, kv_lens=self.kv_lens[bd:])
        return decode, prefill


@struct.dataclass
class DecodeMeta:
    positions: jax.Array  # [B] int32 position of the token being decoded
    slots: jax.Array  # [B] int32 flat cache slot for that token
    block_tables: jax.Array  # [B, max_blocks] int32
    kv_lens: jax.Array  # [B] int32 positions + 1 for live rows, 0 for padding rows


Meta = PrefillMeta | DecodeMeta


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V rows into the paged cache at flat `slots`.

    k_cache, v_cache: [NB, Hkv, BS, D]; k, v: [T, Hkv, D]; slots: [T]. With the cache donated the
    scatter happens in place. A single row is written together with a zero row at slot 0 (the null
    block's first row, which only padding reads): XLA rewrites a one-row scatter into a
    dynamic-update-slice, fuses a duplicate of it into every reader of the new pool, and each
    duplicate copies the whole donated pool (seen on CPU: 2.2 s per step for opt-125m at batch 1
    instead of 30 ms).
    """
    if slots.shape[0] == 1:
        k = jnp.concatenate([k, jnp.zeros_like(k)])
        v = jnp.concatenate([v, jnp.zeros_like(v)])
        slots = jnp.concatenate([slots, jnp.zeros_like(slots)])
    bs = k_cache.shape[2]
    blocks, rows = slots // bs, slots % bs
    # Advanced indices split by the heads slice index [T, Hkv, D] updates: row t of every head.
    k_cache = k_cache.at[blocks, :, rows].set(k.astype(k_cache.dtype), mode="promise_in_bounds")
    v_cache = v_cache.at[blocks, :, rows].set(v.astype(v_cache.dtype), mode="promise_in_bounds")
    return k_cache, v_cache


def _gather_kv(cache: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[NB, Hkv, BS, D] gathered through [B, MB] block tables -> [B, Hkv, MB * BS, D]: each
    request's keys of one head in logical order (the prefill paths' operand; one copy, and each
    decode-attention step's C = MB columns). The gather writes its output in that order itself
    (offset dims placed around the column axis), so no transpose follows it."""
    b, mb = block_tables.shape
    _, hkv, bs, d = cache.shape
    dims = jax.lax.GatherDimensionNumbers(offset_dims=(1, 3, 4), collapsed_slice_dims=(0,), start_index_map=(0,))
    out = jax.lax.gather(cache, block_tables[..., None], dims, slice_sizes=(1, hkv, bs, d),
                         mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)  # [B, Hkv, MB, BS, D]
    return out.reshape(b, hkv, mb * bs, d)


def _softmax_masked(scores, mask):
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1, where=mask)
    return jnp.where(mask, probs, 0.0)  # fully masked rows (padding) give 0, not NaN


def _visible(key_pos, query_pos, sliding_window: int | None):
    """Causal mask, narrowed to the last `sliding_window` positions when set (broadcasting)."""
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask = mask & (key_pos > query_pos - sliding_window)
    return mask


def prefill_attention_xla(q, k_cache, v_cache, meta: PrefillMeta, *, sm_scale: float,
                          sliding_window: int | None = None, k=None, v=None) -> jax.Array:
    """Ragged prefill attention in plain jnp (the CPU path): q [T, Hq, D] -> [T, Hq, D].

    With a cached prefix, query i of request b sits at position kv_len - q_len + i, which is
    exactly `positions`, so "key position <= query position" is the bottom-right-aligned causal
    mask. Two exact formulations; the cheaper one for the (static) shapes is chosen at trace time,
    with B requests, S = max_blocks * block_size keys each, T packed tokens:
      - packed: every token scores against every request's keys, a mask keeps its own:
        T * B * S scores. Best when one request (or long prefixes) dominates (S >= T).
      - padded: queries are regrouped per request into [B, min(T, S)] rows: B * S * min(T, S)
        scores. Best for many short prompts (S < T).

    A mixed batch (meta.num_decode_rows = Bd > 0) is attended in two parts, rows [0, Bd) with the
    decode formulation (Bd * S scores) and rows [Bd, T) with the cheaper of the two above on the
    prefill region alone, then concatenated.
    """
    bd = meta.num_decode_rows
    if meta.fresh and k is not None and not bd:
        return _prefill_fresh(q, k, v, meta, sm_scale, sliding_window)
    if bd:
        _check_split(q, meta)
        decode_meta, prefill_meta = meta.split()
        decoded = decode_attention_xla(q[:bd], k_cache, v_cache, decode_meta, sm_scale=sm_scale,
                                       sliding_window=sliding_window)  # [Bd, Hq, D]
        prefilled = _prefill_unsplit(q[bd:], k_cache, v_cache, prefill_meta, sm_scale, sliding_window)  # [T - Bd, Hq, D]
        return jnp.concatenate([decoded, prefilled], axis=0)
    return _prefill_unsplit(q, k_cache, v_cache, meta, sm_scale, sliding_window)


def _request_of_rows(meta: PrefillMeta, t: int) -> jax.Array:
    """[T] the request that owns each packed row; B (the request count) for padding rows."""
    return jnp.searchsorted(meta.cu_q_lens[1:], jnp.arange(t, dtype=jnp.int32), side="right")


def _prefill_fresh(q, k, v, meta: PrefillMeta, sm_scale, sliding_window):
    """Prompts without a cached prefix attend the step's own K/V: q [T, Hq, D], k, v [T, Hkv, D].

    Packed row j is a key of packed row i exactly when both belong to the same request (segment
    ids from cu_q_lens) and position j <= position i (within the window, if any): T x T scores
    per head in the dots' canonical [Hkv, G, T, T] layout, however many requests share the batch,
    where the cache formulations score T x B x S (packed) or B x S x min(T, S) (padded) and gather
    the keys first. Padding rows (segment B) see no key and give 0.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    nreq = meta.cu_q_lens.shape[0] - 1
    seg = _request_of_rows(meta, t)
    mask = (seg[:, None] == seg[None, :]) & (seg[:, None] < nreq)  # [T(query), T(key)]
    mask = mask & _visible(meta.positions[None, :], meta.positions[:, None], sliding_window)
    qh = (q.reshape(t, hkv, g, d).astype(jnp.float32) * sm_scale).transpose(1, 2, 0, 3)  # [Hkv, G, T, D]
    kh, vh = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [Hkv, T, D]
    scores = jnp.einsum("kgtd,ksd->kgts", qh, kh.astype(jnp.float32))
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))  # masked keys: exp(-inf) = 0
    denom = probs.sum(-1, keepdims=True)
    out = jnp.einsum("kgts,ksd->kgtd", probs, vh.astype(jnp.float32)) / jnp.where(denom > 0, denom, 1.0)
    return out.transpose(2, 0, 1, 3).reshape(t, hq, d).astype(q.dtype)


def _check_split(q, meta: PrefillMeta) -> None:
    bd, t, nreq = meta.num_decode_rows, q.shape[0], meta.block_tables.shape[0]
    if not 0 < bd < min(t, nreq):
        raise ValueError(f"num_decode_rows={bd} must be in (0, min(T, B)) for {q.shape=}, {meta.block_tables.shape=}")


def _prefill_unsplit(q, k_cache, v_cache, meta: PrefillMeta, sm_scale, sliding_window):
    t = q.shape[0]
    s = meta.block_tables.shape[1] * k_cache.shape[2]
    keys = _gather_kv(k_cache, meta.block_tables)  # [B, Hkv, S, D]
    # Rows past a request's length may hold anything (NaN included) and 0 * NaN is NaN: zero them.
    held = jnp.arange(s)[None, :] < meta.kv_lens[:, None]  # [B, S]
    vals = jnp.where(held[:, None, :, None], _gather_kv(v_cache, meta.block_tables), 0)
    if s < t:
        return _prefill_padded(q, keys, vals, meta, sm_scale, sliding_window)
    return _prefill_packed(q, keys, vals, meta, sm_scale, sliding_window)


def _prefill_packed(q, keys, vals, meta: PrefillMeta, sm_scale, sliding_window):
    t, hq, d = q.shape
    nreq, hkv, s, _ = keys.shape
    g = hq // hkv
    seq = _request_of_rows(meta, t)
    own = seq[:, None] == jnp.arange(nreq)[None, :]  # [T, B]
    causal = _visible(jnp.arange(s)[None, :], meta.positions[:, None], sliding_window)  # [T, S]
    mask = (own[:, :, None] & causal[:, None, :]).reshape(t, 1, 1, nreq * s)
    scores = jnp.einsum("tkgd,bksd->tkgbs", q.reshape(t, hkv, g, d), keys, preferred_element_type=jnp.float32) * sm_scale
    probs = _softmax_masked(scores.reshape(t, hkv, g, nreq * s), mask).reshape(t, hkv, g, nreq, s)
    out = jnp.einsum("tkgbs,bksd->tkgd", probs.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
    return out.reshape(t, hq, d).astype(q.dtype)


def _prefill_padded(q, keys, vals, meta: PrefillMeta, sm_scale, sliding_window):
    t, hq, d = q.shape
    nreq, hkv, s, _ = keys.shape
    g = hq // hkv
    qmax = min(t, s)  # a request's queries never outnumber its keys
    starts, q_lens = meta.cu_q_lens[:-1], meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]  # [B]
    rows = jnp.arange(qmax, dtype=jnp.int32)
    valid = rows[None, :] < q_lens[:, None]  # [B, Q]
    idx = jnp.clip(starts[:, None] + rows[None, :], 0, t - 1)  # [B, Q] packed row of each padded query
    qp = q[idx].reshape(nreq, qmax, hkv, g, d)
    pos = meta.positions[idx]  # [B, Q]
    mask = valid[:, :, None] & _visible(jnp.arange(s)[None, None, :], pos[:, :, None], sliding_window)  # [B, Q, S]
    scores = jnp.einsum("bqkgd,bksd->bkgqs", qp, keys, preferred_element_type=jnp.float32) * sm_scale
    probs = _softmax_masked(scores, mask[:, None, None])
    out = jnp.einsum("bkgqs,bksd->bqkgd", probs.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
    # back to packed rows: token t is row t - cu[b] of its request b; padding tokens give 0
    seq = _request_of_rows(meta, t)
    row = jnp.arange(t) - meta.cu_q_lens[jnp.minimum(seq, nreq - 1)]
    packed = out[jnp.minimum(seq, nreq - 1), jnp.clip(row, 0, qmax - 1)]  # [T, Hkv, G, D]
    packed = jnp.where((seq < nreq)[:, None, None, None], packed, 0.0)
    return packed.reshape(t, hq, d).astype(q.dtype)


def decode_attention_xla(q, k_cache, v_cache, meta: DecodeMeta, *, sm_scale: float,
                         sliding_window: int | None = None) -> jax.Array:
    """Paged decode attention in plain jnp: q [B, Hq, D] -> [B, Hq, D]; padding rows give 0.

    Flash-decoding over the block table: a loop over steps j = 0 .. n-1 of _COLUMNS block-table
    columns each, where n covers the batch's longest context (a traced trip count, so the cost
    follows the real context, not the padded table width), gathers those blocks of every request
    straight into [B, Hkv, _COLUMNS * BS, D] (the gather's output puts the heads before the columns,
    and the pool's head-major blocks make each (block, head) one [BS, D] tile, so the per-head dots
    take the keys as they lie), and folds them into a running softmax (max m, denominator l,
    weighted sum acc per query head). Gathering the whole table at once instead materialised
    [B, MB * BS, Hkv, D] per layer: tens of MB written and re-read every step, 10-15x the bandwidth
    floor of reading the KV once on the CPU; with token-major blocks each step's gather was a
    transposing copy, 3-4x the floor. Two columns a step measured 10% faster than one on one CPU
    core, four slower (docs/results.md, "Decode at the roofline"). With a sliding window the loop
    starts at the first step any live request's window reaches, and keys before a request's
    window are masked.

    Rows a request cannot see (past its length, before its window, padding columns) are zeroed in
    the gathered K and V by a bitwise AND with a mask of the pool's bit width (all ones or all
    zeros per row), built once per call for every table position and sliced per step. A freed
    block may hold NaN from a previous owner and 0 * NaN is NaN, so hidden rows must be zeroed, not
    merely given zero probability. On XLA:CPU this form also fuses the gather into a vectorised
    loop: a bare gather, or a select whose mask is computed per element from the key position, ran
    at about half the memory bandwidth (the loop took 1.3x as long on one core).
    """
    b, hq, d = q.shape
    _, hkv, bs, _ = k_cache.shape
    g = hq // hkv
    span = _COLUMNS * bs  # key positions per step
    tables = meta.block_tables  # [B, MB], null-block padded
    tables = jnp.pad(tables, ((0, 0), (0, -tables.shape[1] % _COLUMNS)))  # whole steps: more null blocks
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32) * sm_scale
    num_steps = jnp.minimum((jnp.max(meta.kv_lens) + span - 1) // span, tables.shape[1] // _COLUMNS)
    first_step = 0
    if sliding_window is not None:  # padding rows (kv_len 0) do not hold the loop back
        window_start = jnp.maximum(meta.kv_lens - sliding_window, 0) // span
        first_step = jnp.min(jnp.where(meta.kv_lens > 0, window_start, num_steps))

    key_pos = jnp.arange(tables.shape[1] * bs, dtype=jnp.int32)[None, :]  # every table position
    visible = _visible(key_pos, meta.kv_lens[:, None] - 1, sliding_window)  # [B, MB * BS]
    keep_bits = _row_bits(k_cache.dtype, visible)

    def fold(j, carry):
        m, l, acc = carry  # [B, Hkv, G] running max and denominator, [B, Hkv, G, D] weighted sum
        blocks = jax.lax.dynamic_slice_in_dim(tables, j * _COLUMNS, _COLUMNS, axis=1)  # [B, C]
        keep = jax.lax.dynamic_slice_in_dim(keep_bits, j * span, span, axis=1)  # [B, C * BS]
        live = keep != 0
        keys = _zero_rows(_gather_kv(k_cache, blocks), keep)  # [B, Hkv, C * BS, D]
        vals = _zero_rows(_gather_kv(v_cache, blocks), keep)
        scores = jnp.einsum("bkgd,bkcd->bkgc", qg, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(live[:, None, None, :], scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(-1))  # finite: m starts at _NO_SCORE, not -inf
        probs = jnp.exp(scores - m_new[..., None])  # masked keys: exp(-inf) = 0
        rescale = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgc,bkcd->bkgd", probs.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
        return m_new, l * rescale + probs.sum(-1), acc * rescale[..., None] + pv

    m0 = jnp.full((b, hkv, g), _NO_SCORE, jnp.float32)
    l0 = jnp.zeros((b, hkv, g), jnp.float32)
    _, l, acc = jax.lax.fori_loop(first_step, num_steps, fold, (m0, l0, jnp.zeros((b, hkv, g, d), jnp.float32)))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding rows (kv_len 0): l = 0, acc = 0 -> 0
    return out.reshape(b, hq, d).astype(q.dtype)


# The running max's start: below any real score, yet finite, so exp(m - m_new) never sees inf - inf.
_NO_SCORE = -1e30

# Block-table columns a decode-attention loop step covers.
_COLUMNS = 2


def _row_bits(dtype, visible: jax.Array) -> jax.Array:
    """[B, P] visibility -> an unsigned integer of `dtype`'s width per position: all ones where
    visible, zero where not (the AND mask of `_zero_rows`)."""
    uint = jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")
    return jnp.where(visible, jnp.array(jnp.iinfo(uint).max, uint), jnp.array(0, uint))


def _zero_rows(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x [B, Hkv, BS, D] with row s of request b kept bit for bit where keep[b, s] is all ones and
    replaced by +0 where it is zero (NaN and inf included, unlike a multiply)."""
    uint = keep.dtype
    bits = jax.lax.bitcast_convert_type(x, uint) if x.dtype != uint else x
    bits = bits & keep[:, None, :, None]
    return jax.lax.bitcast_convert_type(bits, x.dtype) if x.dtype != uint else bits


def _tp_mesh():
    """The mesh the program is being traced for, if its "tp" axis splits the heads."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "tp" not in mesh.axis_names or mesh.shape["tp"] == 1:
        return None
    return mesh


def _pallas(q, k_cache, v_cache, meta: Meta, sm_scale: float):
    """The Pallas kernels, per device: under tensor parallelism every device holds whole heads
    (q [T, H/tp, D], pools [NB, Hkv/tp, BS, D]), so the kernel runs inside a shard_map over "tp"
    with replicated metadata; attention needs no communication across heads."""
    import pallas_kernels

    if isinstance(meta, PrefillMeta):
        def kernel(q, k, v, bt, lens, cu):
            return pallas_kernels.ragged_prefill_attention(q, k, v, bt, cu, lens, sm_scale=sm_scale)
        extra = (meta.cu_q_lens,)
    else:
        def kernel(q, k, v, bt, lens):
            return pallas_kernels.paged_decode_attention(q, k, v, bt, lens, sm_scale=sm_scale)
        extra = ()
    args = (q, k_cache, v_cache, meta.block_tables, meta.kv_lens, *extra)
    mesh = _tp_mesh()
    if mesh is None:
        return kernel(*args)
    from jax.sharding import PartitionSpec as P

    heads, pool = P(None, "tp", None), P(None, "tp", None, None)
    specs = (heads, pool, pool) + (P(),) * (len(args) - 3)
    return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)(*args)


def _auto_uses_kernel(q, k_cache, meta: Meta) -> bool:
    """Static choice for backend "auto": kernels on GPU; on CPU, the ragged prefill kernel only
    for shapes whose jnp formulation scores more than AUTO_PREFILL_KERNEL_SCORES pairs."""
    if jax.default_backend() == "gpu":
        return True
    if not isinstance(meta, PrefillMeta):
        return False
    if meta.fresh:  # the jnp path scores T x T pairs (_prefill_fresh)
        return q.shape[0] ** 2 > AUTO_PREFILL_KERNEL_SCORES
    bd = meta.num_decode_rows  # a mixed batch's decode region costs Bd * S scores on the jnp path
    t, nreq = q.shape[0] - bd, meta.block_tables.shape[0] - bd
    s = meta.block_tables.shape[1] * k_cache.shape[2]
    return bd * s + min(t * nreq * s, nreq * s * min(t, s)) > AUTO_PREFILL_KERNEL_SCORES


def attend(q, k_cache, v_cache, meta: Meta, *, sm_scale: float, backend: Backend,
           sliding_window: int | None = None, k=None, v=None) -> jax.Array:
    """Dispatch on the metadata type (prefill or decode) and the static backend name; a sliding
    window (static) runs on the jnp paths only. `k`, `v` [T, Hkv, D]: this step's keys and values
    (as just written to the cache), which a fresh prefill on the jnp path attends directly."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} must be one of {BACKENDS}")
    if sliding_window is not None and backend == "pallas":
        raise ValueError(f"sliding_window={sliding_window} is not supported by the Pallas kernels; use backend 'xla' or 'auto'")
    if sliding_window is None and (backend == "pallas" or (backend == "auto" and _auto_uses_kernel(q, k_cache, meta))):
        return _pallas(q, k_cache, v_cache, meta, sm_scale)
    if isinstance(meta, PrefillMeta):
        return prefill_attention_xla(q, k_cache, v_cache, meta, sm_scale=sm_scale, sliding_window=sliding_window, k=k, v=v)
    return decode_attention_xla(q, k_cache, v_cache, meta, sm_scale=sm_scale, sliding_window=sliding_window)


def default_backend() -> Backend:
    """Pallas kernels on GPU, the jnp path elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"
