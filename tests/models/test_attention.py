"""The jnp attention: the split of a mixed (chunked-prefill) batch against the unsplit formulations,
the blockwise decode against dense attention, and the in-place KV write."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import DecodeMeta, PrefillMeta, decode_attention_xla, prefill_attention_xla
from pallas_kernels import ragged_prefill_reference
from tests.support.kernel_inputs import make_paged_kv, naive_attention
from tests.support.mixed_batch import mixed_batch

SM_SCALE = 0.3
ATOL = 1e-5


# table_blocks 4: S = 16 keys < the prefill region's 32 rows (padded formulation); 16: S = 64 (packed)
@pytest.mark.parametrize("table_blocks", [4, 16])
def test_split_equals_unsplit_on_a_mixed_batch(table_blocks):
    q, k_cache, v_cache, meta, out_rows = mixed_batch(0, table_blocks=table_blocks)
    assert meta.num_decode_rows == 4 and list(out_rows) == [0, 1, 2, 4, 5, 6]  # row 3 pads the decode region
    split = np.asarray(prefill_attention_xla(q, k_cache, v_cache, meta, sm_scale=SM_SCALE))
    # The same packed batch read as a plain ragged prefill: every decode a one-row request.
    unsplit = prefill_attention_xla(q, k_cache, v_cache, dataclasses.replace(meta, num_decode_rows=0), sm_scale=SM_SCALE)
    reference = ragged_prefill_reference(q, k_cache, v_cache, meta.block_tables, meta.cu_q_lens, meta.kv_lens, sm_scale=SM_SCALE)
    assert np.isfinite(split).all()  # the padding decode row included
    np.testing.assert_allclose(split, np.asarray(unsplit), atol=ATOL)
    np.testing.assert_allclose(split, np.asarray(reference), atol=ATOL)
    assert (split[int(meta.cu_q_lens[-1]):] == 0).all()  # padding tokens after the prefill region


def test_split_with_an_empty_prefill_region():
    """A decode region followed by a prefill region of padding only is still valid."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((16, 4, 8)), jnp.float32)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((4, 2, 4, 8)), jnp.float32) for _ in range(2))
    positions = np.zeros(16, np.int32)
    positions[:2] = [4, 2]
    meta = PrefillMeta(positions=jnp.asarray(positions), slots=jnp.zeros(16, jnp.int32),
                       block_tables=jnp.array([[1, 2], [3, 0], [0, 0]], jnp.int32),
                       cu_q_lens=jnp.array([0, 1, 2, 2], jnp.int32), kv_lens=jnp.array([5, 3, 0], jnp.int32),
                       num_decode_rows=2)
    split = np.asarray(prefill_attention_xla(q, k_cache, v_cache, meta, sm_scale=SM_SCALE))
    unsplit = prefill_attention_xla(q, k_cache, v_cache, dataclasses.replace(meta, num_decode_rows=0), sm_scale=SM_SCALE)
    np.testing.assert_allclose(split, np.asarray(unsplit), atol=ATOL)
    assert (split[2:] == 0).all() and (np.abs(split[:2]) > 0).any()


@pytest.mark.parametrize("num_decode_rows", [3, 8])
def test_split_rejects_a_decode_region_without_prefill_region(num_decode_rows):
    q = jnp.zeros((4, 4, 8), jnp.float32)
    cache = jnp.zeros((2, 2, 4, 8), jnp.float32)
    meta = PrefillMeta(positions=jnp.zeros(4, jnp.int32), slots=jnp.zeros(4, jnp.int32),
                       block_tables=jnp.zeros((3, 1), jnp.int32), cu_q_lens=jnp.arange(4, dtype=jnp.int32),
                       kv_lens=jnp.ones(3, jnp.int32), num_decode_rows=num_decode_rows)
    with pytest.raises(ValueError, match=f"num_decode_rows={num_decode_rows}"):
        prefill_attention_xla(q, cache, cache, meta, sm_scale=SM_SCALE)


# kv_lens: one long and several short (the loop runs to the longest; shorter rows mask), a row
# ending on a block edge, one inside the first block, and a padding row (0); table wider than
# the contexts (the loop stops at the longest context, not the table width).
@pytest.mark.parametrize("kv_lens,hq,hkv,block_size,width", [
    ([37, 5, 16, 0], 4, 2, 4, 16),
    ([1], 4, 4, 8, 8),
    ([64, 64], 2, 1, 16, 4),
    ([3, 50, 17, 9, 33, 1, 0, 24], 8, 2, 8, 8),
    ([20, 3], 4, 2, 4, 5),  # odd table width: the loop's last two-column step reads a padding column
])
def test_decode_attention_matches_dense_attention(kv_lens, hq, hkv, block_size, width):
    """The blockwise online-softmax decode against dense float64 attention per request, on a pool
    whose unused rows hold NaN (freed blocks may hold anything a previous owner wrote)."""
    rng = np.random.default_rng(len(kv_lens) + hq)
    kv = make_paged_kv(rng, kv_lens=kv_lens, num_kv_heads=hkv, head_dim=8, block_size=block_size,
                       dtype=jnp.float32, max_blocks=width)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), hq, 8)), jnp.float32)
    meta = DecodeMeta(positions=jnp.maximum(kv.kv_lens - 1, 0), slots=jnp.zeros(len(kv_lens), jnp.int32),
                      block_tables=kv.block_tables, kv_lens=kv.kv_lens)
    out = np.asarray(decode_attention_xla(q, kv.k_cache, kv.v_cache, meta, sm_scale=SM_SCALE))
    for b, n in enumerate(kv_lens):
        if n == 0:
            assert (out[b] == 0).all()  # padding row
            continue
        want = naive_attention(q[b:b + 1], kv.k_seqs[b], kv.v_seqs[b], sm_scale=SM_SCALE, q_positions=[n - 1])
        np.testing.assert_allclose(out[b], want[0], atol=ATOL, rtol=1e-5)


def test_decode_attention_masks_a_bfloat16_pool_bit_for_bit():
    """The hidden-row mask works on the pool's own bit width (16 here): NaN past each length
    never reaches the output, and the result matches float64 attention to bfloat16 precision."""
    kv_lens = [13, 6, 0]
    rng = np.random.default_rng(3)
    kv = make_paged_kv(rng, kv_lens=kv_lens, num_kv_heads=2, head_dim=8, block_size=4, dtype=jnp.bfloat16, max_blocks=6)
    q = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.bfloat16)
    meta = DecodeMeta(positions=jnp.maximum(kv.kv_lens - 1, 0), slots=jnp.zeros(3, jnp.int32),
                      block_tables=kv.block_tables, kv_lens=kv.kv_lens)
    out = np.asarray(decode_attention_xla(q, kv.k_cache, kv.v_cache, meta, sm_scale=SM_SCALE), np.float32)
    assert np.isfinite(out).all() and (out[2] == 0).all()
    for b, n in enumerate(kv_lens[:2]):
        want = naive_attention(q[b:b + 1], kv.k_seqs[b], kv.v_seqs[b], sm_scale=SM_SCALE, q_positions=[n - 1])
        np.testing.assert_allclose(out[b], want[0], atol=3e-2, rtol=3e-2)


def test_one_row_kv_write_keeps_the_donated_pool_in_place():
    """A batch-1 decode writes one K/V row; compiled with the pool donated, the program must not
    copy the pool (XLA turns a one-row scatter into an update it duplicates per reader)."""
    import jax

    from models.attention import write_kv

    pool = jnp.zeros((64, 2, 16, 8), jnp.float32)

    def step(k_cache, v_cache, k, v, slots, meta):
        k_cache, v_cache = write_kv(k_cache, v_cache, k, v, slots)
        return decode_attention_xla(k[:, :, :] * 1.0, k_cache, v_cache, meta, sm_scale=SM_SCALE), k_cache, v_cache

    row = jnp.ones((1, 2, 8), jnp.float32)
    meta = DecodeMeta(positions=jnp.array([4]), slots=jnp.array([20]), block_tables=jnp.array([[1, 0]], jnp.int32),
                      kv_lens=jnp.array([5], jnp.int32))
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(pool, pool, row, row, meta.slots, meta).compile().as_text()
    pool_copies = [line for line in hlo.splitlines() if "f32[64,2,16,8]" in line and " copy(" in line]
    assert pool_copies == []
    out, k_cache, _ = jax.jit(step, donate_argnums=(0, 1))(jnp.zeros_like(pool), jnp.zeros_like(pool), row, row, meta.slots, meta)
    assert float(k_cache[1, :, 4].sum()) == 16.0 and float(k_cache[0, 0].sum()) == 0.0  # slot 20 = block 1, row 4


# ----------------------------------------------------------------------------- sliding window


def windowed_attention(q, keys, vals, q_positions, window: int, sm_scale: float) -> np.ndarray:
    """Dense float64 GQA attention of one request's queries [Tq, Hq, D] over its keys/values
    [S, Hkv, D], query at p seeing keys p - window < k <= p (Hugging Face's sliding window)."""
    q, keys, vals = (np.asarray(x, np.float64) for x in (q, keys, vals))
    group = q.shape[1] // keys.shape[1]
    keys, vals = np.repeat(keys, group, axis=1), np.repeat(vals, group, axis=1)
    k_pos, q_pos = np.arange(keys.shape[0])[None, :], np.asarray(q_positions)[:, None]
    visible = (k_pos <= q_pos) & (k_pos > q_pos - window)  # [Tq, S]
    logits = np.where(visible[None], np.einsum("thd,shd->hts", q, keys) * sm_scale, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", weights / weights.sum(-1, keepdims=True), vals)


# table_blocks 4: the padded prefill formulation; 16: the packed one. Window 6 against block size
# 4: windows start mid-block, and the 16-token decode and the cached-prefix chunks slide past blocks.
@pytest.mark.parametrize("table_blocks", [4, 16])
def test_sliding_window_on_a_mixed_batch(table_blocks):
    window = 6
    q, k_cache, v_cache, meta, _ = mixed_batch(2, table_blocks=table_blocks)
    out = np.asarray(prefill_attention_xla(q, k_cache, v_cache, meta, sm_scale=SM_SCALE, sliding_window=window))
    plain = np.asarray(prefill_attention_xla(q, k_cache, v_cache, meta, sm_scale=SM_SCALE))
    cu, kv_lens = np.asarray(meta.cu_q_lens), np.asarray(meta.kv_lens)
    for b in range(len(kv_lens)):
        rows, blocks = np.arange(cu[b], cu[b + 1]), np.asarray(meta.block_tables[b])
        if kv_lens[b] == 0 or not blocks.any():
            continue  # a padding request (prefill region) or padding decode row (null block only)
        keys = np.asarray(k_cache)[blocks].transpose(0, 2, 1, 3).reshape(-1, k_cache.shape[1], k_cache.shape[3])[:kv_lens[b]]
        vals = np.asarray(v_cache)[blocks].transpose(0, 2, 1, 3).reshape(-1, v_cache.shape[1], v_cache.shape[3])[:kv_lens[b]]
        want = windowed_attention(q[rows], keys, vals, np.asarray(meta.positions)[rows], window, SM_SCALE)
        np.testing.assert_allclose(out[rows], want, atol=ATOL, err_msg=f"request {b}")
        if kv_lens[b] <= window:  # the window covers the whole context: plain causal attention
            np.testing.assert_allclose(out[rows], plain[rows], atol=ATOL)
    assert not np.allclose(out, plain, atol=ATOL)  # some request did slide


@pytest.mark.parametrize("window", [1, 5, 16, 100])
def test_sliding_window_decode_matches_dense(window):
    """Blocks wholly before every live window are skipped, the rest masked; NaN-poisoned spare
    rows and a padding row (kv_len 0) included."""
    kv_lens, hq, hkv, block_size = [37, 5, 16, 0, 50], 4, 2, 4
    rng = np.random.default_rng(window)
    kv = make_paged_kv(rng, kv_lens=kv_lens, num_kv_heads=hkv, head_dim=8, block_size=block_size,
                       dtype=jnp.float32, max_blocks=16)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), hq, 8)), jnp.float32)
    meta = DecodeMeta(positions=jnp.maximum(kv.kv_lens - 1, 0), slots=jnp.zeros(len(kv_lens), jnp.int32),
                      block_tables=kv.block_tables, kv_lens=kv.kv_lens)
    out = np.asarray(decode_attention_xla(q, kv.k_cache, kv.v_cache, meta, sm_scale=SM_SCALE, sliding_window=window))
    for b, n in enumerate(kv_lens):
        if n == 0:
            assert (out[b] == 0).all()
            continue
        want = windowed_attention(q[b:b + 1], kv.k_seqs[b], kv.v_seqs[b], [n - 1], window, SM_SCALE)
        np.testing.assert_allclose(out[b], want[0], atol=ATOL, rtol=1e-5, err_msg=f"row {b}")


@pytest.mark.parametrize("lens,window", [((5, 16, 1, 9), None), ((30,), None), ((7, 12), 4), ((3,), None)])
def test_fresh_prefill_attends_its_own_kv_as_the_cache_paths_do(lens, window):
    """A batch of prompts without a cached prefix: attending the step's own K/V (T x T scores under
    a segment mask) equals attending the paged cache they were just written to; padding rows give 0."""
    from models.attention import write_kv

    rng = np.random.default_rng(sum(lens))
    hq, hkv, d, bs = 4, 2, 8, 4
    t = 1 << (sum(lens) - 1).bit_length()  # padded like a prefill bucket
    positions, slots, tables, cu, next_block = np.zeros(t, np.int32), np.zeros(t, np.int32), [], [0], 1
    for n in lens:
        blocks = list(range(next_block, next_block + -(-n // bs)))
        next_block += len(blocks)
        rows = np.arange(cu[-1], cu[-1] + n)
        positions[rows] = np.arange(n)
        slots[rows] = np.asarray(blocks)[np.arange(n) // bs] * bs + np.arange(n) % bs
        tables.append(blocks + [0] * (8 - len(blocks)))
        cu.append(cu[-1] + n)
    meta = PrefillMeta(positions=jnp.asarray(positions), slots=jnp.asarray(slots), block_tables=jnp.asarray(tables, jnp.int32),
                       cu_q_lens=jnp.asarray(cu, jnp.int32), kv_lens=jnp.asarray(lens, jnp.int32))
    q, k, v = (jnp.asarray(rng.standard_normal((t, h, d)), jnp.float32) for h in (hq, hkv, hkv))
    pool = jnp.full((next_block, hkv, bs, d), jnp.nan, jnp.float32)  # unused rows: anything
    k_cache, v_cache = write_kv(pool, pool, k, v, meta.slots)
    cached = prefill_attention_xla(q, k_cache, v_cache, meta, sm_scale=SM_SCALE, sliding_window=window)
    fresh = prefill_attention_xla(q, k_cache, v_cache, dataclasses.replace(meta, fresh=True), sm_scale=SM_SCALE,
                                  sliding_window=window, k=k, v=v)
    real = cu[-1]
    np.testing.assert_allclose(np.asarray(fresh)[:real], np.asarray(cached)[:real], atol=ATOL, rtol=1e-5)
    assert (np.asarray(fresh)[real:] == 0).all()


def test_pack_prefill_marks_only_prefix_free_batches_fresh():
    from dsjax.engine.request import Chunk, Request
    from dsjax.engine.sampling_params import SamplingParams
    from dsjax.runtime.batch import pack_prefill

    reqs = [Request(request_id=f"r{i}", prompt_token_ids=list(range(1, 10)), sampling=SamplingParams(max_tokens=2), seed=0)
            for i in range(2)]
    tables = [[1, 2, 3], [4, 5, 6]]
    assert pack_prefill([Chunk(r, 0, 9) for r in reqs], tables, 4, fresh_ok=True)[1].fresh
    assert not pack_prefill([Chunk(r, 0, 9) for r in reqs], tables, 4)[1].fresh  # the caller did not allow it
    assert not pack_prefill([Chunk(reqs[0], 0, 9), Chunk(reqs[1], 4, 9)], tables, 4, fresh_ok=True)[1].fresh
