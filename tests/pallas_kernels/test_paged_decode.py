"""paged_decode_attention against its jnp reference and a dense float64 attention, in interpret mode.

Same adversarial set-up as the prefill tests: NaN in every cache slot that holds no valid token, and
(through the test-only path) NaN-filled partial-output buffers, so a split the kernel fails to write
or a slot it must not read turns the result NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import DecodeBlockSizes, paged_decode, paged_decode_attention, paged_decode_reference
from pallas_kernels.block_sizes import decode_block_sizes, decode_num_splits
from tests.support import kernel_inputs as testing

SM_SCALE = 0.3
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SMALL_TILES = DecodeBlockSizes(block_kv=16, max_num_splits=4, min_split_tokens=16, num_warps=4, num_stages=2)
BLOCK_SIZE = 8
# kv_len per request at block_size 8, block_kv 16; with 3 splits, 64 leaves the last split empty,
# 33 puts a single key in the last one, and 1 uses only the first.
EDGE_KV_LENS = (1, 7, 8, 9, 0, 16, 17, 33, 64, 5)

_poisoned_decode = jax.jit(
    paged_decode._paged_decode_call,
    static_argnames=("sm_scale", "block_sizes", "num_splits", "interpret", "poison_output"),
)


def _make_inputs(seed, *, kv_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype):
    rng = np.random.default_rng(seed)
    kv = testing.make_paged_kv(
        rng, kv_lens=kv_lens, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype
    )
    q = jnp.asarray(rng.standard_normal((len(kv_lens), num_q_heads, head_dim)), dtype)
    return q, kv


def _dense_expected(q, kv):
    """Dense float64 attention of each request's token (at position kv_len - 1); padding rows 0."""
    expected = np.zeros(q.shape, np.float64)
    q32 = np.asarray(q.astype(jnp.float32))
    for b, (k_seq, v_seq) in enumerate(zip(kv.k_seqs, kv.v_seqs)):
        if len(k_seq):
            expected[b : b + 1] = testing.naive_attention(
                q32[b : b + 1], k_seq, v_seq, sm_scale=SM_SCALE, q_positions=[len(k_seq) - 1]
            )
    return expected


def _check(out, q, kv, dtype, *, check_reference=True):
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any(), f"NaN in requests {sorted(set(np.nonzero(np.isnan(out))[0]))}"
    padding = np.asarray(kv.kv_lens) == 0
    assert (out[padding] == 0).all(), "padding rows (kv_len 0) must be exactly 0"
    assert testing.relative_error(out, _dense_expected(q, kv)) < TOLERANCE[dtype]
    if check_reference:
        ref = paged_decode_reference(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.kv_lens, sm_scale=SM_SCALE)
        assert testing.relative_error(out, ref.astype(jnp.float32)) < TOLERANCE[dtype]


def _run_poisoned(q, kv, *, num_splits, block_sizes=SMALL_TILES):
    return _poisoned_decode(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.kv_lens,
        sm_scale=SM_SCALE, block_sizes=block_sizes, num_splits=num_splits, interpret=True, poison_output=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "dtype, group",
    [(jnp.float32, 1), (jnp.float32, 4), (jnp.float32, 8), (jnp.bfloat16, 1), (jnp.bfloat16, 4), (jnp.bfloat16, 8)]
    + [(jnp.float32, 3)],  # a group that is not a power of 2
)
def test_split_k_edge_cases_with_poisoned_output(dtype, group):
    q, kv = _make_inputs(
        group, kv_lens=EDGE_KV_LENS, num_q_heads=2 * group, num_kv_heads=2, head_dim=16, block_size=BLOCK_SIZE,
        dtype=dtype,
    )  # fmt: skip
    _check(_run_poisoned(q, kv, num_splits=3), q, kv, dtype)


@pytest.mark.parametrize("dtype, group", [(jnp.float32, 4), (jnp.bfloat16, 8)])
def test_single_split_with_poisoned_output(dtype, group):
    q, kv = _make_inputs(
        10 + group, kv_lens=EDGE_KV_LENS, num_q_heads=2 * group, num_kv_heads=2, head_dim=16,
        block_size=BLOCK_SIZE, dtype=dtype,
    )  # fmt: skip
    _check(_run_poisoned(q, kv, num_splits=1), q, kv, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_public_entry_with_shipped_block_sizes(dtype):
    """Few long requests: the heuristic picks several splits of the shipped tile size."""
    kv_lens = (300, 0, 129)
    q, kv = _make_inputs(3, kv_lens=kv_lens, num_q_heads=4, num_kv_heads=1, head_dim=16, block_size=16, dtype=dtype)
    sizes = decode_block_sizes(head_dim=16, dtype=dtype)
    assert decode_num_splits(batch=3, num_kv_heads=1, max_context=kv.block_tables.shape[1] * 16, sizes=sizes) == 2
    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.kv_lens, sm_scale=SM_SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check(out, q, kv, dtype, check_reference=False)


@pytest.mark.parametrize(
    "head_dim", [pytest.param(32, marks=pytest.mark.slow), 64, pytest.param(128, marks=pytest.mark.slow)]
)
def test_head_dims(head_dim):
    q, kv = _make_inputs(
        head_dim, kv_lens=(21, 9, 0, 40), num_q_heads=4, num_kv_heads=2, head_dim=head_dim, block_size=BLOCK_SIZE,
        dtype=jnp.float32,
    )  # fmt: skip
    out = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.kv_lens, sm_scale=SM_SCALE, block_sizes=SMALL_TILES, num_splits=2
    )
    _check(out, q, kv, jnp.float32, check_reference=False)


def test_cache_blocks_larger_than_kv_tile():
    block_size = 32  # > block_kv 16: one cache block spans two KV tiles
    q, kv = _make_inputs(
        5, kv_lens=(33, 32, 1, 95), num_q_heads=8, num_kv_heads=2, head_dim=16, block_size=block_size,
        dtype=jnp.float32,
    )  # fmt: skip
    _check(_run_poisoned(q, kv, num_splits=3), q, kv, jnp.float32, check_reference=False)


def test_head_major_pool_and_gather_kv():
    """The test pools are head-major (token p of request b at [block_tables[b, p // bs], h, p % bs]),
    and `_common.gather_kv` turns them into per-head logical sequences, zero past kv_len."""
    from pallas_kernels import _common

    _, kv = _make_inputs(
        7, kv_lens=(5, 0, 19), num_q_heads=3, num_kv_heads=3, head_dim=16, block_size=BLOCK_SIZE, dtype=jnp.float32
    )
    cache, tables = np.asarray(kv.k_cache), np.asarray(kv.block_tables)
    assert cache.shape[1:] == (3, BLOCK_SIZE, 16)
    gathered = np.asarray(_common.gather_kv(kv.k_cache, kv.block_tables, kv.kv_lens))  # [B, Hkv, S, D]
    assert gathered.shape == (3, 3, tables.shape[1] * BLOCK_SIZE, 16)
    for b, k_seq in enumerate(kv.k_seqs):
        for p in range(len(k_seq)):
            np.testing.assert_array_equal(cache[tables[b, p // BLOCK_SIZE], :, p % BLOCK_SIZE], k_seq[p])
        np.testing.assert_array_equal(gathered[b, :, : len(k_seq)], k_seq.transpose(1, 0, 2))
        assert (gathered[b, :, len(k_seq) :] == 0).all()  # NaN-poisoned slots past kv_len come out 0


@pytest.mark.parametrize("group", [1, 3, 8])
def test_reference_matches_dense_attention(group):
    q, kv = _make_inputs(
        100 + group, kv_lens=EDGE_KV_LENS, num_q_heads=2 * group, num_kv_heads=2, head_dim=16,
        block_size=BLOCK_SIZE, dtype=jnp.float32,
    )  # fmt: skip
    ref = paged_decode_reference(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.kv_lens, sm_scale=SM_SCALE)
    assert testing.relative_error(ref, _dense_expected(q, kv)) < 1e-5


def test_combine_splits_equals_one_softmax():
    """Softmax over a row split into parts, merged by log-sum-exp, equals the softmax of the whole."""
    rng = np.random.default_rng(0)
    num_splits, part_len, head_dim = 4, 5, 3
    logits2 = rng.standard_normal((num_splits, part_len)) * 4  # base-2 logits
    values = rng.standard_normal((num_splits, part_len, head_dim))
    lse = np.log2(np.exp2(logits2).sum(axis=1))  # [S]
    o_parts = np.einsum("sn,snd->sd", np.exp2(logits2 - lse[:, None]), values)  # [S, D]
    lse[2] = -np.inf  # an empty split: its (zero) output must not count
    o_parts[2] = 0.0
    keep = np.arange(num_splits) != 2
    weights = np.exp2(logits2[keep].ravel())
    expected = weights @ values[keep].reshape(-1, head_dim) / weights.sum()
    got = paged_decode._combine_splits(
        jnp.asarray(o_parts, jnp.float32)[None, :, None, None, :], jnp.asarray(lse, jnp.float32)[None, :, None, None]
    )
    np.testing.assert_allclose(np.asarray(got)[0, 0, 0], expected, rtol=1e-5, atol=1e-6)
    all_empty = paged_decode._combine_splits(jnp.zeros((1, 2, 1, 1, 3)), jnp.full((1, 2, 1, 1), -jnp.inf))
    assert (np.asarray(all_empty) == 0).all()


@pytest.mark.parametrize(
    "batch, num_kv_heads, max_context, expected",
    [(1, 8, 32768, 16), (1, 8, 4096, 16), (1, 8, 512, 2), (64, 8, 32768, 1), (4, 8, 32768, 9), (2, 1, 100, 1)],
)
def test_num_splits_heuristic(batch, num_kv_heads, max_context, expected):
    sizes = decode_block_sizes(head_dim=128, dtype=jnp.bfloat16)
    assert decode_num_splits(batch=batch, num_kv_heads=num_kv_heads, max_context=max_context, sizes=sizes) == expected


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_compiled_on_gpu(dtype, group):
    q, kv = _make_inputs(
        group, kv_lens=(1, 17, 0, 1000, 4097), num_q_heads=4 * group, num_kv_heads=4, head_dim=128, block_size=16,
        dtype=dtype,
    )  # fmt: skip
    out = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.kv_lens, sm_scale=SM_SCALE, interpret=False
    )
    _check(out, q, kv, dtype, check_reference=False)
