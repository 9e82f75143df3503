"""The paged KV pool on device and how large it can be.

One instance's pool is a `models.KVCache`: for each of its layers a K and a V array of shape
[num_blocks, num_kv_heads, block_size, head_dim] (head-major blocks: each head's rows of a block
are one contiguous [block_size, head_dim] tile; models/attention.py says why). Block 0 is the null
block (see dsjax/engine/block_manager.py). With tensor parallelism the kv_heads axis (1) is
sharded over the mesh's "tp" axis, so each device holds num_kv_heads / tp heads of every block.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from models.config import ModelConfig

if TYPE_CHECKING:
    from models.transformer import KVCache


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    num_blocks: int = 256
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 2 (block 0 is the null block)")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size={self.block_size} must be one of 8, 16, 32, 64, 128")


def allocate_cache(config: ModelConfig, cache: CacheConfig, dtype, num_layers: int | None = None, sharding=None) -> KVCache:
    """Zero-filled pool for `num_layers` layers (all by default), placed with `sharding` if given."""
    # jax only here: `CacheConfig` and the sizing below serve jax-free processes too (an emulated
    # worker, dsjax/runtime/emulated.py).
    import jax
    import jax.numpy as jnp

    from models.transformer import KVCache

    n = config.num_layers if num_layers is None else num_layers
    shape = (cache.num_blocks, config.num_kv_heads, cache.block_size, config.head_dim)

    def make():
        return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in range(n)), v=tuple(jnp.zeros(shape, dtype) for _ in range(n)))

    if sharding is None:
        return make()
    return jax.jit(make, out_shardings=sharding)()


def num_blocks_for_memory(config: ModelConfig, block_size: int, dtype_bytes: int, memory_bytes: int) -> int:
    """How many blocks fit in `memory_bytes` of KV memory (all layers, K and V)."""
    per_block = config.kv_bytes_per_token(dtype_bytes) * block_size
    return max(2, memory_bytes // per_block)
