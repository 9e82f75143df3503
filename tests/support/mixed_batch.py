"""A chunked-prefill step's attention inputs in the split layout (models/attention.py), packed by
the engine's own `pack_prefill`: one-token decode chunks first, then prompt chunks, over a small
paged cache of random, finite K/V (the null block included: padding decode rows read its row 0)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.engine.request import Chunk, Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.runtime.batch import pack_prefill

BLOCK_SIZE = 4
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16  # GQA 2:1; the kernels need head_dim >= 16
DECODE_KV_LENS = (5, 16, 1)  # three decodes -> a decode region of 4 rows, one of them padding
PROMPT_CHUNKS = ((7, 7), (5, 13), (8, 16))  # (q_len, kv_len): fresh, cached prefix, cached prefix


def mixed_batch(seed: int, *, table_blocks: int, decode_kv_lens=DECODE_KV_LENS, prompt_chunks=PROMPT_CHUNKS):
    """-> (q [T, Hq, D], k_cache, v_cache [NB, Hkv, BS, D], PrefillMeta, out_rows), all jnp but out_rows.

    Every block table has `table_blocks` entries (the block manager allocates a prompt's blocks
    whole), which sets S = next_pow2(table_blocks) * BLOCK_SIZE keys per request and so which
    prefill formulation the jnp path picks."""
    rng = np.random.default_rng(seed)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    chunks, tables = [], []
    next_block = 1  # block 0 is the null block
    for i, (q_len, kv_len) in enumerate([(1, n) for n in decode_kv_lens] + list(prompt_chunks)):
        req = Request(request_id=f"r{i}", prompt_token_ids=rng.integers(0, 100, kv_len).tolist(), sampling=sp, seed=0)
        chunks.append(Chunk(req, kv_len - q_len, kv_len))
        tables.append(list(range(next_block, next_block + table_blocks)))
        next_block += table_blocks
    num_decodes = len(decode_kv_lens) if prompt_chunks else 0
    _, meta, _, out_rows = pack_prefill(chunks, tables, BLOCK_SIZE, num_decodes=num_decodes)
    num_tokens = meta.positions.shape[0]
    shape = (next_block, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    k_cache, v_cache = rng.standard_normal(shape), rng.standard_normal(shape)
    q = rng.standard_normal((num_tokens, NUM_Q_HEADS, HEAD_DIM))
    as_f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return as_f32(q), as_f32(k_cache), as_f32(v_cache), jax.tree.map(jnp.asarray, meta), out_rows
