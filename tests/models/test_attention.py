"""The jnp attention's split of a mixed (chunked-prefill) batch against the unsplit formulations."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import PrefillMeta, prefill_attention_xla
from pallas_kernels import ragged_prefill_reference
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
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((4, 4, 2, 8)), jnp.float32) for _ in range(2))
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
    cache = jnp.zeros((2, 4, 2, 8), jnp.float32)
    meta = PrefillMeta(positions=jnp.zeros(4, jnp.int32), slots=jnp.zeros(4, jnp.int32),
                       block_tables=jnp.zeros((3, 1), jnp.int32), cu_q_lens=jnp.arange(4, dtype=jnp.int32),
                       kv_lens=jnp.ones(3, jnp.int32), num_decode_rows=num_decode_rows)
    with pytest.raises(ValueError, match=f"num_decode_rows={num_decode_rows}"):
        prefill_attention_xla(q, cache, cache, meta, sm_scale=SM_SCALE)
