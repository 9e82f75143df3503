"""Host-side packing of a scheduled batch into the programs' padded numpy inputs.

Prefill packs each chunk's tokens back to back (request b owns rows cu_q_lens[b]:cu_q_lens[b+1])
and pads to the bucket from dsjax/shapes.py; padding tokens write to slot 0 of the null block and
padding requests have zero lengths. A chunk covers positions [start, end) of a request whose
earlier positions are already in the cache (a chunked prefill or a recompute keeps start = 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsjax import shapes
from dsjax.request import Request
from dsjax.sampling import SamplingArrays
from models.attention import DecodeMeta, PrefillMeta


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Positions [start, end) of `request` to prefill; `end == request.num_tokens` samples a token."""

    request: Request
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def _tables(tables: list[list[int]], rows: int, width: int) -> np.ndarray:
    out = np.zeros((rows, width), np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


def pack_prefill(chunks: list[Chunk], tables: list[list[int]], block_size: int):
    """-> (token_ids [T], PrefillMeta, SamplingArrays) as numpy, padded to the prefill bucket."""
    total = sum(c.num_tokens for c in chunks)
    max_blocks = max(len(t) for t in tables)
    t_pad, b_pad, mb_pad = shapes.prefill_bucket(total, len(chunks), max_blocks)
    token_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slots = np.zeros(t_pad, np.int32)
    cu = np.full(b_pad + 1, total, np.int32)
    kv_lens = np.zeros(b_pad, np.int32)
    off = 0
    for i, (c, table) in enumerate(zip(chunks, tables)):
        cu[i] = off
        toks = c.request.prefill_token_ids[c.start : c.end]
        pos = np.arange(c.start, c.end, dtype=np.int32)
        token_ids[off : off + c.num_tokens] = toks
        positions[off : off + c.num_tokens] = pos
        slots[off : off + c.num_tokens] = np.asarray(table, np.int32)[pos // block_size] * block_size + pos % block_size
        kv_lens[i] = c.end
        off += c.num_tokens
    meta = PrefillMeta(positions=positions, slots=slots, block_tables=_tables(tables, b_pad, mb_pad), cu_q_lens=cu, kv_lens=kv_lens)
    return token_ids, meta, SamplingArrays.from_requests([c.request for c in chunks], b_pad)


def pack_decode(reqs: list[Request], tables: list[list[int]], block_size: int):
    """-> (token_ids [B], DecodeMeta, SamplingArrays): each request feeds its last token, which
    sits at position num_tokens - 1 and is attended with kv_len = num_tokens."""
    max_blocks = max(len(t) for t in tables)
    b_pad, mb_pad = shapes.decode_bucket(len(reqs), max_blocks)
    token_ids = np.zeros(b_pad, np.int32)
    positions = np.zeros(b_pad, np.int32)
    slots = np.zeros(b_pad, np.int32)
    kv_lens = np.zeros(b_pad, np.int32)
    for i, (r, table) in enumerate(zip(reqs, tables)):
        pos = r.num_tokens - 1
        token_ids[i] = r.output_token_ids[-1]
        positions[i] = pos
        slots[i] = table[pos // block_size] * block_size + pos % block_size
        kv_lens[i] = pos + 1
    meta = DecodeMeta(positions=positions, slots=slots, block_tables=_tables(tables, b_pad, mb_pad), kv_lens=kv_lens)
    return token_ids, meta, SamplingArrays.from_requests(reqs, b_pad)
