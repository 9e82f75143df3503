"""Moving one request's KV blocks from a prefill instance's pool to a decode instance's pool.

The handoff is described once by `KVDescriptor` (which layers, heads, blocks, dtype, page size)
and serves both the in-process path here and the gRPC wire format (serving/kv_transfer.py).

In process the copy is three steps, per piece of the request's block list:
1. gather: on each source pipeline stage, a jitted gather of the request's blocks from every layer
   it holds -> [L_s, n, BS, Hkv, D], still sharded over the source mesh's "tp" axis (heads);
2. move: `jax.device_put` of each layer range onto the destination stage that holds those layers,
   with the destination's head sharding, so TP and PP may differ (heads split or merged, layers
   regrouped across stages);
3. insert: a jitted scatter into the destination pool at the freshly allocated block ids, which
   donates the pool so the write is in place.
The source blocks may be freed only after the insert has completed (`block_until_ready`).

Block lists are cut into pieces of power-of-two length (at most 16 blocks) so that only a few
gather/insert shapes ever compile, while exactly the request's blocks move: no padding bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dsjax import sharding as shd

MAX_PIECE = 16


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
        per_block = self.block_size * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize
        return 2 * self.num_layers * self.num_blocks * per_block


def pieces(n: int) -> list[tuple[int, int]]:
    """[start, end) runs covering range(n), each of a power-of-two length <= MAX_PIECE."""
    out, start = [], 0
    while start < n:
        size = min(MAX_PIECE, 1 << ((n - start).bit_length() - 1))
        out.append((start, start + size))
        start += size
    return out


@jax.jit
def _gather(ks, vs, ids):
    # ks, vs: tuples of [NB, BS, H, D] per layer; ids [n] -> [L, n, BS, H, D] each
    return jnp.stack([k[ids] for k in ks]), jnp.stack([v[ids] for v in vs])


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _insert(ks, vs, ids, k_new, v_new):
    # k_new, v_new: [L, n, BS, H, D] written to blocks `ids` of each layer's pool
    ks = tuple(k.at[ids].set(k_new[i]) for i, k in enumerate(ks))
    vs = tuple(v.at[ids].set(v_new[i]) for i, v in enumerate(vs))
    return ks, vs


def _heads_sharding(stage, ndim: int):
    if stage.mesh is None:
        return jax.devices()[0]
    spec = [None] * ndim
    spec[3] = shd.TP_AXIS  # [L, n, BS, H, D]: heads over tp
    return NamedSharding(stage.mesh, P(*spec))


def _put_ids(stage, ids: np.ndarray):
    return jnp.asarray(ids) if stage.mesh is None else jax.device_put(ids, shd.replicated(stage.mesh))


def migrate(src, src_table: list[int], dst, dst_table: list[int]) -> int:
    """Copy a request's blocks from runner `src` to runner `dst` (same model); returns the bytes
    moved. Blocks up to len(src_table) are copied; the caller frees src blocks afterwards."""
    if src.block_size != dst.block_size:
        raise ValueError(f"block sizes differ: prefill block_size={src.block_size}, decode block_size={dst.block_size}")
    if len(dst_table) < len(src_table):
        raise ValueError(f"destination table has {len(dst_table)} blocks, source {len(src_table)}")
    moved = 0
    for a, b in pieces(len(src_table)):
        src_ids = np.asarray(src_table[a:b], np.int32)
        dst_ids = np.asarray(dst_table[a:b], np.int32)
        # 1. gather on every source stage: layer range -> (k, v) [L_s, n, BS, H, D]
        parts = [(s.first_layer, s.last_layer, *_gather(s.cache.k, s.cache.v, _put_ids(s, src_ids))) for s in src.stages]
        for d in dst.stages:
            ks, vs = [], []
            for first, last, k, v in parts:
                lo, hi = max(first, d.first_layer), min(last, d.last_layer)
                if lo >= hi:
                    continue
                ks.append(k[lo - first : hi - first])
                vs.append(v[lo - first : hi - first])
            # 2. move (and reshard heads) onto the destination stage's mesh
            target = _heads_sharding(d, 5)
            k_dst = [jax.device_put(x, target) for x in ks]
            v_dst = [jax.device_put(x, target) for x in vs]
            moved += sum(x.nbytes for x in k_dst) + sum(x.nbytes for x in v_dst)
            k_cat = k_dst[0] if len(k_dst) == 1 else jnp.concatenate(k_dst)
            v_cat = v_dst[0] if len(v_dst) == 1 else jnp.concatenate(v_dst)
            # 3. insert in place (the pool is donated)
            new_k, new_v = _insert(d.cache.k, d.cache.v, _put_ids(d, dst_ids), k_cat, v_cat)
            d.cache = type(d.cache)(k=new_k, v=new_v)
    for d in dst.stages:  # the copy has landed once the last inserts are done
        jax.block_until_ready(d.cache)
    return moved
