"""The shape policy: which padded shapes the jitted programs are compiled for.

Every dynamic size is rounded up to a bucket so that a serving run compiles a handful of programs:

- prefill: total packed tokens T -> next power of two >= 16; number of requests B -> next power of
  two; block-table width MB -> next power of two of the longest request's blocks.
- decode: batch B -> next power of two; block-table width MB -> next power of two, at least the
  runner's floor (the XLA decode loop's cost follows the real lengths, not the table width, so
  there the floor covers the whole context and one width serves every batch). (Batch 1 is
  its own bucket: XLA:CPU runs a one-row matmul as a matrix-vector product at the bandwidth floor,
  and two rows as a GEMM at twice the time, 18 vs 39 ms for opt-125m's layers on one core.
  models/attention.py `write_kv` keeps the one-row KV write in place.)

- mixed prefill (a chunked-prefill step: Bd one-token decode chunks before prompt chunks, see
  models/attention.py): each region padded as its own program would be. Decode region Bd ->
  next power of two, at least 2; the prompt chunks' N requests -> next power of two and their
  tokens T_p -> next power of two >= 16; T = Bd_pad + T_p, B = Bd_pad + N_pad; block-table width as
  for prefill. Pure prefill batches keep the prefill bucket. (Rounding Bd_pad + T_p as a whole
  would double T whenever the decodes push a budget-sized chunk past a power of two: 8 decodes
  + a 128-token chunk ran as T = 256, 18 ms, against 3 + 8 ms for the two programs apart.)

So a prefill program is keyed by (T, B, MB) and a decode program by (B, MB): with a 2048-token
context and 16-token blocks at most 8 x 5 x 8 prefill and 6 x 8 decode variants exist, and a
workload touches far fewer (mixed steps add the decode-region size Bd_pad to the prefill key).
Padding rows use the null block (block 0) and zero lengths.
"""

from __future__ import annotations


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def prefill_bucket(num_tokens: int, num_seqs: int, max_blocks: int) -> tuple[int, int, int]:
    return next_pow2(num_tokens, 16), next_pow2(num_seqs), next_pow2(max_blocks)


def decode_bucket(batch: int, max_blocks: int, min_blocks: int = 1) -> tuple[int, int]:
    return next_pow2(batch), next_pow2(max_blocks, min_blocks)


def mixed_prefill_bucket(num_decodes: int, num_tokens: int, num_seqs: int, max_blocks: int) -> tuple[int, int, int, int]:
    """(Bd_pad, T, B, MB) of a mixed batch of num_decodes decode chunks plus num_seqs prompt chunks
    holding num_tokens tokens; T and B count both regions' rows and requests."""
    bd = next_pow2(num_decodes, 2)
    return bd, bd + next_pow2(num_tokens, 16), bd + next_pow2(num_seqs), next_pow2(max_blocks)
