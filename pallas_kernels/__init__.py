"""Pallas (Triton) attention kernels over dsjax's paged KV cache (block-major, head-major within a block).

Public entry points (see docs/kernels.md):
    ragged_prefill_attention / ragged_prefill_reference: packed ragged causal prefill.
    paged_decode_attention / paged_decode_reference: one token per request, split-K decode.
Block sizes per (head_dim, dtype) live in `pallas_kernels.block_sizes`.
"""

from pallas_kernels.block_sizes import (
    DecodeBlockSizes,
    PrefillBlockSizes,
    decode_block_sizes,
    prefill_block_sizes,
)
from pallas_kernels.paged_decode import paged_decode_attention, paged_decode_reference
from pallas_kernels.ragged_prefill import ragged_prefill_attention, ragged_prefill_reference

__all__ = [
    "DecodeBlockSizes",
    "PrefillBlockSizes",
    "decode_block_sizes",
    "paged_decode_attention",
    "paged_decode_reference",
    "prefill_block_sizes",
    "ragged_prefill_attention",
    "ragged_prefill_reference",
]
