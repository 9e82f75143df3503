"""ragged_prefill_attention against its jnp reference and a dense float64 attention, in interpret mode.

Every run uses the adversarial cache of `tests.support.kernel_inputs` (unused slots and the null block
are NaN), and most run through the test-only path whose output buffer starts as NaN, so a row the
kernel never writes or a slot it must not read shows up as NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import PrefillBlockSizes, ragged_prefill, ragged_prefill_attention, ragged_prefill_reference
from tests.support import kernel_inputs as testing

SM_SCALE = 0.3
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Small tiles so that tiny shapes still cross tile boundaries: block_q = 16 // pow2(G) tokens.
SMALL_TILES = PrefillBlockSizes(block_m=16, block_kv=16, num_warps=4, num_stages=2)
BLOCK_SIZE = 8
# (q_len, kv_len) per request, at block_size 8 and block_kv 16.
EDGE_REQUESTS = (
    (1, 1),  # a single token
    (7, 7),  # block boundary - 1
    (8, 8),  # exactly one full block
    (9, 9),  # block boundary + 1
    (0, 0),  # padding request
    (3, 19),  # cached prefix of 16, last block partly filled
    (17, 17),  # KV tile boundary + 1
    (16, 40),  # cached prefix of 24, all blocks full
    (0, 5),  # no new queries, stale KV
    (1, 33),  # one query after a long prefix
)
NUM_PADDING_ROWS = 5

_poisoned_prefill = jax.jit(
    ragged_prefill._ragged_prefill_call, static_argnames=("sm_scale", "block_sizes", "interpret", "poison_output")
)

_tile_table = jax.jit(ragged_prefill._tile_table, static_argnames=("num_tokens", "block_q"))


def _make_inputs(seed, *, requests, num_q_heads, num_kv_heads, head_dim, block_size, dtype, num_padding_rows):
    rng = np.random.default_rng(seed)
    q_lens = [q_len for q_len, _ in requests]
    kv_lens = [kv_len for _, kv_len in requests]
    kv = testing.make_paged_kv(
        rng, kv_lens=kv_lens, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype
    )
    q, cu_q_lens = testing.pack_queries(
        rng, q_lens=q_lens, num_q_heads=num_q_heads, head_dim=head_dim, dtype=dtype, num_padding_rows=num_padding_rows
    )
    return q, kv, cu_q_lens


def _dense_expected(q, kv, cu_q_lens):
    """Dense float64 attention per request on the contiguous copies; padding rows 0."""
    expected = np.zeros(q.shape, np.float64)
    q32 = np.asarray(q.astype(jnp.float32))
    for b, (k_seq, v_seq) in enumerate(zip(kv.k_seqs, kv.v_seqs)):
        start, end = int(cu_q_lens[b]), int(cu_q_lens[b + 1])
        if end > start:
            q_positions = len(k_seq) - (end - start) + np.arange(end - start)
            expected[start:end] = testing.naive_attention(
                q32[start:end], k_seq, v_seq, sm_scale=SM_SCALE, q_positions=q_positions
            )
    return expected


def _check(out, q, kv, cu_q_lens, dtype, *, check_reference=True):
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any(), f"NaN in rows {sorted(set(np.nonzero(np.isnan(out))[0]))}"
    real_rows = int(cu_q_lens[-1])
    assert (out[real_rows:] == 0).all(), "padding rows must be exactly 0"
    assert testing.relative_error(out, _dense_expected(q, kv, cu_q_lens)) < TOLERANCE[dtype]
    if check_reference:
        ref = ragged_prefill_reference(
            q, kv.k_cache, kv.v_cache, kv.block_tables, cu_q_lens, kv.kv_lens, sm_scale=SM_SCALE
        )
        assert testing.relative_error(out, ref.astype(jnp.float32)) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "dtype, group",
    [(jnp.float32, 1), (jnp.float32, 4), (jnp.float32, 8), (jnp.bfloat16, 1), (jnp.bfloat16, 4), (jnp.bfloat16, 8)]
    + [(jnp.float32, 3)],  # a group that is not a power of 2 (padded, masked query heads)
)
def test_edge_cases_with_poisoned_output(dtype, group):
    num_kv_heads = 2
    q, kv, cu_q_lens = _make_inputs(
        group,
        requests=EDGE_REQUESTS,
        num_q_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=16,
        block_size=BLOCK_SIZE,
        dtype=dtype,
        num_padding_rows=NUM_PADDING_ROWS,
    )
    out = _poisoned_prefill(
        q, kv.k_cache, kv.v_cache, kv.block_tables, cu_q_lens, kv.kv_lens,
        sm_scale=SM_SCALE, block_sizes=SMALL_TILES, interpret=True, poison_output=True,
    )  # fmt: skip
    _check(out, q, kv, cu_q_lens, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_public_entry_with_shipped_block_sizes(dtype):
    q, kv, cu_q_lens = _make_inputs(
        7, requests=EDGE_REQUESTS, num_q_heads=8, num_kv_heads=2, head_dim=16, block_size=BLOCK_SIZE, dtype=dtype,
        num_padding_rows=NUM_PADDING_ROWS,
    )  # fmt: skip
    out = ragged_prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, cu_q_lens, kv.kv_lens, sm_scale=SM_SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check(out, q, kv, cu_q_lens, dtype, check_reference=False)


@pytest.mark.parametrize(
    "head_dim", [pytest.param(32, marks=pytest.mark.slow), 64, pytest.param(128, marks=pytest.mark.slow)]
)
def test_head_dims(head_dim):
    requests = ((5, 21), (9, 9), (0, 0))
    q, kv, cu_q_lens = _make_inputs(
        head_dim, requests=requests, num_q_heads=4, num_kv_heads=2, head_dim=head_dim, block_size=BLOCK_SIZE,
        dtype=jnp.float32, num_padding_rows=2,
    )  # fmt: skip
    out = ragged_prefill_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, cu_q_lens, kv.kv_lens, sm_scale=SM_SCALE, block_sizes=SMALL_TILES
    )
    _check(out, q, kv, cu_q_lens, jnp.float32, check_reference=False)


@pytest.mark.parametrize("block_size", [16, 32])
def test_cache_block_sizes(block_size):
    """Cache blocks larger than the KV tile (32 > block_kv 16) and the engine's default 16."""
    requests = ((block_size + 1, block_size + 1), (3, 2 * block_size + 3), (1, block_size))
    q, kv, cu_q_lens = _make_inputs(
        block_size, requests=requests, num_q_heads=8, num_kv_heads=2, head_dim=16, block_size=block_size,
        dtype=jnp.float32, num_padding_rows=3,
    )  # fmt: skip
    out = _poisoned_prefill(
        q, kv.k_cache, kv.v_cache, kv.block_tables, cu_q_lens, kv.kv_lens,
        sm_scale=SM_SCALE, block_sizes=SMALL_TILES, interpret=True, poison_output=True,
    )  # fmt: skip
    _check(out, q, kv, cu_q_lens, jnp.float32, check_reference=False)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_reference_matches_dense_attention(group):
    q, kv, cu_q_lens = _make_inputs(
        100 + group, requests=EDGE_REQUESTS, num_q_heads=2 * group, num_kv_heads=2, head_dim=16,
        block_size=BLOCK_SIZE, dtype=jnp.float32, num_padding_rows=NUM_PADDING_ROWS,
    )  # fmt: skip
    ref = ragged_prefill_reference(q, kv.k_cache, kv.v_cache, kv.block_tables, cu_q_lens, kv.kv_lens, sm_scale=SM_SCALE)
    expected = _dense_expected(q, kv, cu_q_lens)
    assert testing.relative_error(ref, expected) < 1e-5
    assert (np.asarray(ref)[int(cu_q_lens[-1]) :] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_tile_table_covers_every_row_once(seed):
    """Request tiles cover their rows exactly once; padding tiles cover cu_q_lens[B]:T."""
    rng = np.random.default_rng(seed)
    block_q = int(rng.choice([1, 2, 4, 16]))
    q_lens = rng.integers(0, 3 * block_q + 2, size=int(rng.integers(1, 8)))
    num_tokens = int(q_lens.sum()) + int(rng.integers(0, 2 * block_q + 1))
    num_tokens = max(num_tokens, 1)
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kv_lens = jnp.asarray(q_lens + rng.integers(0, 20, size=len(q_lens)), jnp.int32)
    table = np.asarray(_tile_table(cu_q_lens, kv_lens, num_tokens=num_tokens, block_q=block_q))
    covered = np.zeros(num_tokens, np.int32)
    for request, row_start, row_end, first_q_pos, kv_len in table:
        rows = np.arange(row_start, min(row_start + block_q, row_end, num_tokens))
        covered[rows] += 1
        if kv_len > 0:  # a request tile: its first query's position follows the bottom-right rule
            q_len = int(q_lens[request])
            assert first_q_pos == kv_len - q_len + (row_start - int(cu_q_lens[request]))
    assert (covered == 1).all()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_compiled_on_gpu(dtype, group):
    requests = ((1, 1), (200, 200), (31, 1000), (0, 0), (129, 513))
    q, kv, cu_q_lens = _make_inputs(
        group, requests=requests, num_q_heads=4 * group, num_kv_heads=4, head_dim=128, block_size=16,
        dtype=dtype, num_padding_rows=7,
    )  # fmt: skip
    out = ragged_prefill_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, cu_q_lens, kv.kv_lens, sm_scale=SM_SCALE, interpret=False
    )
    _check(out, q, kv, cu_q_lens, dtype, check_reference=False)
