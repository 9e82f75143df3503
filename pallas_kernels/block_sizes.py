"""Block sizes of the paged attention kernels, per (head_dim, dtype). A data module: no jax.

UNTUNED. No GPU was available when these were chosen: they are defaults reasoned from Triton tile
shapes on H100/H200 (228 KiB shared memory and 64K 32-bit registers per SM, at most 255 registers per
thread), not measurements. Retune with `python -m dsjax.bench kernels` on the target GPU and record
the numbers in docs/kernels.md.

Reasoning behind the defaults:
* Prefill is compute bound. A program keeps a [block_m, D] query tile and an f32 accumulator of the
  same shape in registers and streams [block_kv, D] K and V tiles through shared memory, num_stages
  deep. bf16, D = 128: block_m 128 x block_kv 64 on 8 warps holds the accumulator in 64 registers per
  thread and two stages of K+V in 64 KiB of shared memory, the usual FlashAttention-2 shape for
  Triton on Hopper; smaller heads afford 4 warps and 3 stages. float32 tiles cost twice the
  registers and bytes (and f32 dots run without tensor cores), so they are halved.
* Decode is bandwidth bound. Its block_m is just the query heads of one KV head (padded to >= 16),
  so the size that matters is block_kv: 64 bf16 tokens x 128 dims = 16 KiB per K (or V) tile, three
  stages in flight = 96 KiB of shared memory, enough outstanding loads to cover HBM latency. Smaller
  heads take longer tiles for the same bytes.
* Split-K: enough splits that batch x kv_heads x splits covers about two waves of the 132 SMs of an
  H100 SXM, never more than 16, and no split shorter than min_split_tokens, so the partial outputs
  and the log-sum-exp combine stay small beside the KV bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Programs that fill an H100 SXM (132 SMs) about twice; the split-K heuristic aims for this many.
TARGET_DECODE_PROGRAMS = 2 * 132


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_launch(num_warps: int, num_stages: int) -> None:
    if not _is_power_of_2(num_warps):
        raise ValueError(f"{num_warps=} must be a power of 2")
    if num_stages < 1:
        raise ValueError(f"{num_stages=} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillBlockSizes:
    """Tiles of `ragged_prefill_attention`.

    block_m:  query rows per program = query tokens x query heads of one KV head (padded to a power
              of 2); a program takes max(1, block_m // group_pad) tokens of one request.
    block_kv: keys per step of the inner loop.
    """

    block_m: int
    block_kv: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name, value in (("block_m", self.block_m), ("block_kv", self.block_kv)):
            if not _is_power_of_2(value) or value < 16:
                raise ValueError(f"{name}={value} must be a power of 2 and >= 16 (Triton dot tiles)")
        _check_launch(self.num_warps, self.num_stages)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeBlockSizes:
    """Tiles of `paged_decode_attention`.

    block_kv:         keys per step of the inner loop.
    max_num_splits:   at most this many split-K partitions of one request's context.
    min_split_tokens: no partition is shorter than this (rounded up to block_kv), so short contexts
                      use fewer partitions and the programs of the others exit at once.
    """

    block_kv: int
    max_num_splits: int
    min_split_tokens: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        if not _is_power_of_2(self.block_kv) or self.block_kv < 16:
            raise ValueError(f"block_kv={self.block_kv} must be a power of 2 and >= 16 (Triton dot tiles)")
        if self.max_num_splits < 1:
            raise ValueError(f"max_num_splits={self.max_num_splits} must be >= 1")
        if self.min_split_tokens < 1:
            raise ValueError(f"min_split_tokens={self.min_split_tokens} must be >= 1")
        _check_launch(self.num_warps, self.num_stages)


def _prefill(block_m: int, block_kv: int, num_warps: int, num_stages: int) -> PrefillBlockSizes:
    return PrefillBlockSizes(block_m=block_m, block_kv=block_kv, num_warps=num_warps, num_stages=num_stages)


def _decode(block_kv: int, num_warps: int, num_stages: int) -> DecodeBlockSizes:
    return DecodeBlockSizes(
        block_kv=block_kv, max_num_splits=16, min_split_tokens=256, num_warps=num_warps, num_stages=num_stages
    )


# (head_dim, dtype name) -> sizes. tests/kernels lowers every entry for CUDA.
#                                    block_m block_kv warps stages
PREFILL_BLOCK_SIZES: dict[tuple[int, str], PrefillBlockSizes] = {
    (16, "bfloat16"): _prefill(64, 64, 4, 3),
    (32, "bfloat16"): _prefill(64, 64, 4, 3),
    (64, "bfloat16"): _prefill(128, 64, 4, 3),
    (128, "bfloat16"): _prefill(128, 64, 8, 2),
    (16, "float32"): _prefill(64, 32, 4, 2),
    (32, "float32"): _prefill(64, 32, 4, 2),
    (64, "float32"): _prefill(64, 64, 4, 2),
    (128, "float32"): _prefill(64, 32, 4, 2),
}

#                                   block_kv warps stages  (max_num_splits 16, min_split_tokens 256)
DECODE_BLOCK_SIZES: dict[tuple[int, str], DecodeBlockSizes] = {
    (16, "bfloat16"): _decode(128, 4, 3),
    (32, "bfloat16"): _decode(128, 4, 3),
    (64, "bfloat16"): _decode(128, 4, 3),
    (128, "bfloat16"): _decode(64, 4, 3),
    (16, "float32"): _decode(128, 4, 3),
    (32, "float32"): _decode(128, 4, 3),
    (64, "float32"): _decode(64, 4, 3),
    (128, "float32"): _decode(32, 4, 3),
}


def _key(head_dim: int, dtype) -> tuple[int, str]:
    return int(head_dim), np.dtype(dtype).name


def prefill_block_sizes(*, head_dim: int, dtype) -> PrefillBlockSizes:
    """The shipped prefill tiles for this head_dim and dtype."""
    try:
        return PREFILL_BLOCK_SIZES[_key(head_dim, dtype)]
    except KeyError:
        known = sorted(PREFILL_BLOCK_SIZES)
        dtype_name = np.dtype(dtype).name
        raise ValueError(f"no prefill block sizes for {head_dim=}, dtype={dtype_name}; known: {known}") from None


def decode_block_sizes(*, head_dim: int, dtype) -> DecodeBlockSizes:
    """The shipped decode tiles for this head_dim and dtype."""
    try:
        return DECODE_BLOCK_SIZES[_key(head_dim, dtype)]
    except KeyError:
        known = sorted(DECODE_BLOCK_SIZES)
        dtype_name = np.dtype(dtype).name
        raise ValueError(f"no decode block sizes for {head_dim=}, dtype={dtype_name}; known: {known}") from None


def decode_num_splits(*, batch: int, num_kv_heads: int, max_context: int, sizes: DecodeBlockSizes) -> int:
    """Split-K partitions per request, from static shapes only.

    Enough programs (batch x num_kv_heads x splits) for TARGET_DECODE_PROGRAMS, at most
    sizes.max_num_splits, and no more than the longest possible context (max_context =
    max_blocks * block_size) has min_split_tokens chunks. The kernel then sizes each request's
    partitions from its actual kv_len.
    """
    by_occupancy = -(-TARGET_DECODE_PROGRAMS // max(1, batch * num_kv_heads))
    by_length = -(-max_context // sizes.min_split_tokens)
    return max(1, min(sizes.max_num_splits, by_occupancy, by_length))
