"""Host-side packing of a scheduled batch into the programs' padded numpy inputs.

Prefill packs each chunk's tokens back to back (request b owns rows cu_q_lens[b]:cu_q_lens[b+1])
and pads to the bucket from dsjax/engine/shapes.py; padding tokens write to slot 0 of the null block and
padding requests have zero lengths. A chunk covers positions [start, end) of a request whose
earlier positions are already in the cache (a chunked prefill or a recompute keeps start = 0).

A mixed batch (the caller's `num_decodes` leading one-token chunks, the decodes of a fused
chunked-prefill step, followed by at least one longer chunk) is packed in the split layout of
models/attention.py: the one-token chunks take requests and rows 0..nd-1, padding decode requests nd..Bd_pad-1 (q_len 1, kv_len 1,
position 0, slot 0, all-null block table) fill the decode region, and the other chunks are packed
from row and request Bd_pad on. The sampled token of chunk j is then on output row j for j < nd and
Bd_pad + j - nd after, which `pack_prefill` returns as `out_rows`.

Whether a batch is mixed is the caller's to say, never inferred from chunk lengths: a plain
prefill batch may well start with a one-token chunk (a one-token prompt, or the last token of a
prompt after a cached prefix), and packing it as mixed would run a program shape the plain-prefill
warm-up never compiled (a 0.5-1.4 s stall inside served steps, seen in the benchmark's step logs).
"""

from __future__ import annotations

import numpy as np

from dsjax.engine import shapes
from dsjax.engine.request import Chunk, Request
from dsjax.runtime.sampling import SamplingArrays
from models.attention import DecodeMeta, PrefillMeta


def _tables(tables: list[list[int]], rows: int, width: int) -> np.ndarray:
    return _tables_at(tables, range(len(tables)), rows, width)


def _tables_at(tables: list[list[int]], at, rows: int, width: int) -> np.ndarray:
    """[rows, width] int32 block tables, tables[i] on row at[i]; other entries 0 (the null block)."""
    out = np.zeros((rows, width), np.int32)
    for i, t in zip(at, tables, strict=True):
        out[i, : len(t)] = t
    return out


def _check_decodes(chunks: list[Chunk], num_decodes: int) -> int:
    """`num_decodes` when it names a valid decode region (0 < nd < len(chunks), all one-token
    chunks); 0 for a plain batch; a ValueError otherwise."""
    if num_decodes == 0:
        return 0
    if not 0 < num_decodes < len(chunks) or any(c.num_tokens != 1 for c in chunks[:num_decodes]):
        raise ValueError(f"num_decodes={num_decodes} must count leading one-token chunks followed by at least one "
                         f"prompt chunk; chunk lengths {[c.num_tokens for c in chunks]}")
    return num_decodes


def pack_prefill(chunks: list[Chunk], tables: list[list[int]], block_size: int, num_decodes: int = 0,
                 fresh_ok: bool = False):
    """-> (token_ids [T], PrefillMeta, SamplingArrays, out_rows [len(chunks)]) as numpy, padded to
    the prefill bucket, or with `num_decodes` > 0 the mixed one (see the module docstring);
    out_rows[j] is the row of the program's [B] output that holds chunk j's sampled token. With
    `fresh_ok`, a plain batch whose chunks all start at position 0 is marked `fresh`."""
    nd = _check_decodes(chunks, num_decodes)
    prompt_chunks = chunks[nd:]
    total = sum(c.num_tokens for c in prompt_chunks)
    max_blocks = max(len(t) for t in tables)
    if nd:
        bd, t_pad, b_pad, mb_pad = shapes.mixed_prefill_bucket(nd, total, len(prompt_chunks), max_blocks)
    else:
        bd = 0
        t_pad, b_pad, mb_pad = shapes.prefill_bucket(total, len(chunks), max_blocks)
    token_ids = np.zeros(t_pad, np.int32)  # [T]
    positions = np.zeros(t_pad, np.int32)  # [T]
    slots = np.zeros(t_pad, np.int32)  # [T]
    cu = np.full(b_pad + 1, bd + total, np.int32)  # [B + 1]; padding prefill requests are empty
    cu[: bd + 1] = np.arange(bd + 1)  # decode region: request i owns row i
    kv_lens = np.zeros(b_pad, np.int32)  # [B]
    kv_lens[nd:bd] = 1  # padding decode requests see the null block's row 0 (written this step)
    out_rows = np.concatenate([np.arange(nd), bd + np.arange(len(prompt_chunks))]).astype(np.int32)
    for row, c, table in zip(out_rows, chunks, tables, strict=True):
        off = cu[row]  # decode chunk i: row i; prompt chunks: back to back from row bd
        toks = c.request.prefill_token_ids[c.start : c.end]
        pos = np.arange(c.start, c.end, dtype=np.int32)
        token_ids[off : off + c.num_tokens] = toks
        positions[off : off + c.num_tokens] = pos
        slots[off : off + c.num_tokens] = np.asarray(table, np.int32)[pos // block_size] * block_size + pos % block_size
        kv_lens[row] = c.end
        cu[row + 1] = off + c.num_tokens
    meta = PrefillMeta(positions=positions, slots=slots, block_tables=_tables_at(tables, out_rows, b_pad, mb_pad),
                       cu_q_lens=cu, kv_lens=kv_lens, num_decode_rows=bd,
                       fresh=fresh_ok and not bd and all(c.start == 0 for c in chunks))
    sampling = SamplingArrays.from_requests([c.request for c in chunks], b_pad, rows=out_rows)
    return token_ids, meta, sampling, out_rows


def pack_decode(reqs: list[Request], tables: list[list[int]], block_size: int, min_blocks: int = 1,
                ahead: list[bool] | None = None):
    """-> (token_ids [B], DecodeMeta, SamplingArrays): each request feeds its last token, which
    sits at position num_tokens - 1 and is attended with kv_len = num_tokens. Block tables are at
    least `min_blocks` wide (the runner's `decode_min_blocks`). A request marked in `ahead` holds
    one token more than its record (an overlapped step: that token is still on the device), so it
    feeds position num_tokens; its token_ids entry is left 0 for the caller to fill on the device."""
    max_blocks = max(len(t) for t in tables)
    b_pad, mb_pad = shapes.decode_bucket(len(reqs), max_blocks, min_blocks)
    token_ids = np.zeros(b_pad, np.int32)
    positions = np.zeros(b_pad, np.int32)
    slots = np.zeros(b_pad, np.int32)
    kv_lens = np.zeros(b_pad, np.int32)
    steps = np.zeros(b_pad, np.int32)
    for i, (r, table) in enumerate(zip(reqs, tables)):
        extra = int(bool(ahead and ahead[i]))
        pos = r.num_tokens - 1 + extra
        token_ids[i] = 0 if extra else r.output_token_ids[-1]
        positions[i] = pos
        slots[i] = table[pos // block_size] * block_size + pos % block_size
        kv_lens[i] = pos + 1
        steps[i] = len(r.output_token_ids) + extra
    meta = DecodeMeta(positions=positions, slots=slots, block_tables=_tables(tables, b_pad, mb_pad), kv_lens=kv_lens)
    sampling = SamplingArrays.from_requests(reqs, b_pad)
    return token_ids, meta, sampling.replace(step=steps)
