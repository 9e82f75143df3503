"""The engine's shape buckets as the latency model sees them: which features a padded step costs.

Our engine compiles its programs for padded shapes (dsjax/engine/shapes.py), so a step takes the time of
its padded program, not of its exact batch. `ShapeBuckets` maps a batch to the features of the
latency forms (latency.py) at the padded shape; profiles of our engine record it in
`metadata.shape_buckets`, DistServe's have none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dsjax.engine import shapes

ATTENTION_KINDS = ("dense", "padded", "ragged")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShapeBuckets:
    """The engine's padded program shapes, so a simulated step costs what its padded program costs.

    A prefill of n prompts (lengths l_i, T = sum l_i) runs the program of shapes.prefill_bucket
    (T_pad >= 16, B_pad, MB_pad), a decode of B requests that of shapes.decode_bucket (B_pad,
    MB_pad), MB being the blocks of the longest request and S_pad = MB_pad * block_size its padded
    key count. The features of the latency forms become, by `attention`:

                  prefill tokens, quadratic         decode batch, context
        ragged    T_pad,  sum l_i^2                 B_pad,  sum(ctx + 1)
        padded    T_pad,  T_pad * S_pad             B_pad,  B_pad * S_pad
        dense     T_pad,  T_pad * B_pad * S_pad     B_pad,  B_pad * S_pad

    "ragged": kernels that skip padding (the Pallas ones). "dense": the XLA path's arithmetic
    (models/attention.py: every padded token scores against the gathered keys of every padded
    request). "padded" (every padded token against one padded request's keys) is what the XLA
    path's *time* follows best on CPU: on uniform batches it equals sum l_i^2 (the time does not
    grow with B at a fixed T*S), and a lone 684-token prompt costs the 1024 x 1024 program; mixed
    batches cost more still. docs/planner.md ("Engine profiler") has the measurements. On a
    uniform, bucket-aligned batch (B prompts of l tokens, l a power of two >= block_size) "ragged"
    and "padded" reduce to DistServe's plain forms; the profiler measures such batches.
    """

    block_size: int = 16
    attention: str = "padded"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} must be one of {ATTENTION_KINDS}")

    @property
    def decode_pads_context(self) -> bool:
        """Whether a decode step costs the padded width of the longest context."""
        return self.attention != "ragged"

    def padded_keys(self, max_len: float) -> int:
        """S_pad: the block-table width of a request with `max_len` keys, in keys."""
        return shapes.next_pow2(-(-int(max_len) // self.block_size)) * self.block_size

    def prefill_features(self, sum_len: float, sum_len_sq: float, num_seqs: int, max_len: float) -> tuple[float, float]:
        t_pad, b_pad, _ = shapes.prefill_bucket(int(sum_len), max(num_seqs, 1), 1)
        if self.attention == "ragged":
            return float(t_pad), float(sum_len_sq)
        keys = t_pad * self.padded_keys(max_len)
        return float(t_pad), float(keys * b_pad if self.attention == "dense" else keys)

    def decode_features(self, batch_size: int, sum_ctx_plus_1: float, max_ctx_plus_1: float) -> tuple[int, float]:
        b_pad, _ = shapes.decode_bucket(batch_size, 1)
        if not self.decode_pads_context:
            return b_pad, float(sum_ctx_plus_1)
        return b_pad, float(b_pad * self.padded_keys(max_ctx_plus_1))

    def steps_to_reshape(self, max_ctx_plus_1: int) -> int | None:
        """Decode steps until the longest context outgrows its padded width (None: cost does not
        depend on the width). The step cost is constant until then."""
        if not self.decode_pads_context:
            return None
        return self.padded_keys(max_ctx_plus_1) - int(max_ctx_plus_1) + 1

    def to_json(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "attention": self.attention}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ShapeBuckets":
        unknown = set(d) - {"block_size", "attention"}
        if unknown:
            raise ValueError(f"shape_buckets has unknown fields {sorted(unknown)}")
        return cls(block_size=int(d.get("block_size", 16)), attention=str(d.get("attention", "padded")))
