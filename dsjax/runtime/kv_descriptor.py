"""`KVDescriptor`: one request's KV as it leaves its prefill instance (no jax).

It describes the arrays that move, for the in-process path (dsjax/runtime/migration.py) and the
gRPC wire format (serving/kv_transfer.py) alike, so the serving workers and the emulated runtime
(dsjax/runtime/emulated.py) can use it without loading jax.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVDescriptor:
    """A request's KV as it leaves its prefill instance: layers [0, num_layers), all heads, the
    first `num_tokens` positions held in `num_blocks` blocks of `block_size` rows."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_tokens: int
    dtype: str

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)

    @property
    def nbytes(self) -> int:
        """K and V bytes of all the request's blocks (whole blocks move)."""
        per_block = self.block_size * self.num_kv_heads * self.head_dim * np.dtype(self.dtype).itemsize
        return 2 * self.num_layers * self.num_blocks * per_block
