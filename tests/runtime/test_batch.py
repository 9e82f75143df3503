"""Host-side packing: the split layout of a mixed (chunked-prefill) batch, and plain batches."""

import numpy as np
import pytest

from dsjax.engine.request import Chunk, Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.runtime.batch import pack_prefill

BLOCK_SIZE = 4


def _request(rid, prompt, outputs=(), temperature=0.0):
    sp = SamplingParams(max_tokens=8, temperature=temperature)
    return Request(request_id=rid, prompt_token_ids=list(prompt), output_token_ids=list(outputs), sampling=sp, seed=7)


def _decode(req):
    return Chunk(req, req.num_tokens - 1, req.num_tokens)


# Decodes: token 6 at position 5 (block table [3, 7]), 11 at 3 ([5]), 42 at 2 ([1]).
DECODES = [(_request("d0", [1, 2, 3, 4, 5], [6]), [3, 7]), (_request("d1", [8, 9, 10], [11]), [5]),
           (_request("d2", [40], [41, 42]), [1])]
# Prompt chunks: positions 2..5 of a 6-token prompt ([2, 4]), a whole 3-token prompt ([6]).
PROMPTS = [(Chunk(_request("p0", range(20, 26)), 2, 6), [2, 4]),
           (Chunk(_request("p1", [30, 31, 32], temperature=0.7), 0, 3), [6])]


def test_mixed_batch_split_layout():
    chunks = [_decode(r) for r, _ in DECODES] + [c for c, _ in PROMPTS]
    tables = [t for _, t in DECODES] + [t for _, t in PROMPTS]
    token_ids, meta, sampling, out_rows = pack_prefill(chunks, tables, BLOCK_SIZE, num_decodes=3)
    # 3 decodes -> decode region of 4 rows (row 3 padding); 7 prompt tokens from row 4, padded to 16
    assert meta.num_decode_rows == 4
    pad = [0] * 9
    np.testing.assert_array_equal(token_ids, [6, 11, 42, 0, 22, 23, 24, 25, 30, 31, 32] + pad)
    np.testing.assert_array_equal(meta.positions, [5, 3, 2, 0, 2, 3, 4, 5, 0, 1, 2] + pad)
    np.testing.assert_array_equal(meta.slots, [29, 23, 6, 0, 10, 11, 16, 17, 24, 25, 26] + pad)
    np.testing.assert_array_equal(meta.cu_q_lens, [0, 1, 2, 3, 4, 8, 11])
    np.testing.assert_array_equal(meta.kv_lens, [6, 4, 3, 1, 6, 3])  # padding decode: kv_len 1
    np.testing.assert_array_equal(meta.block_tables, [[3, 7], [5, 0], [1, 0], [0, 0], [2, 4], [6, 0]])
    np.testing.assert_array_equal(out_rows, [0, 1, 2, 4, 5])
    # sampling rows follow the requests; the padding row is greedy
    np.testing.assert_allclose(sampling.temperature, [0, 0, 0, 0, 0, 0.7])
    np.testing.assert_array_equal(sampling.step, [1, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(sampling.seed, [7, 7, 7, 0, 7, 7])
    # the program samples from each request's last packed row: decode row i, prompt chunk's last
    np.testing.assert_array_equal((meta.cu_q_lens[1:] - 1)[out_rows], [0, 1, 2, 7, 10])


def test_batches_without_a_longer_chunk_after_decodes_are_not_split():
    prompts_only = [c for c, _ in PROMPTS]
    _, meta, _, out_rows = pack_prefill(prompts_only, [t for _, t in PROMPTS], BLOCK_SIZE)
    assert meta.num_decode_rows == 0 and meta.positions.shape == (16,) and meta.block_tables.shape == (2, 2)
    np.testing.assert_array_equal(meta.cu_q_lens, [0, 4, 7])
    np.testing.assert_array_equal(out_rows, [0, 1])
    decodes_only = [_decode(r) for r, _ in DECODES]
    _, meta, _, out_rows = pack_prefill(decodes_only, [t for _, t in DECODES], BLOCK_SIZE)
    assert meta.num_decode_rows == 0 and meta.block_tables.shape == (4, 2)  # today's prefill bucket
    np.testing.assert_array_equal(meta.cu_q_lens, [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(out_rows, [0, 1, 2])
    # one-token chunks leading a plain batch are prompts, not a decode region: a one-token prompt
    # (or a prompt's last token after a cached prefix) must run the plain program the warm-up
    # compiled, not a mixed one
    one = Chunk(_request("p2", [9]), 0, 1)
    _, meta, _, out_rows = pack_prefill([one, PROMPTS[1][0]], [[8], PROMPTS[1][1]], BLOCK_SIZE)
    assert meta.num_decode_rows == 0 and meta.positions.shape == (16,) and meta.block_tables.shape == (2, 1)
    np.testing.assert_array_equal(meta.cu_q_lens, [0, 1, 4])
    np.testing.assert_array_equal(out_rows, [0, 1])
    for bad in (1, 2):  # a decode region needs one-token chunks and a prompt chunk after them
        with pytest.raises(ValueError, match="num_decodes"):
            pack_prefill([PROMPTS[0][0], _decode(DECODES[0][0])], [PROMPTS[0][1], DECODES[0][1]], BLOCK_SIZE, num_decodes=bad)
