"""Moving one request's KV blocks from a prefill instance's pool to a decode instance's pool.

The handoff is described once by `KVDescriptor` (which layers, heads, blocks, dtype, page size)
and serves both the in-process path here and the gRPC wire format (serving/kv_transfer.py).

In process the copy is three steps, per piece of the request's block list:
1. gather: on each source pipeline stage, a jitted gather of the request's blocks from every layer
   it holds -> [L_s, n, Hkv, BS, D], still sharded over the source mesh's "tp" axis (heads);
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.runtime import sharding as shd
from dsjax.runtime.kv_descriptor import KVDescriptor  # noqa: F401  (re-exported: the handoff's description)

MAX_PIECE = 16


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
    # ks, vs: tuples of [NB, H, BS, D] per layer; ids [n] -> [L, n, H, BS, D] each
    return jnp.stack([k[ids] for k in ks]), jnp.stack([v[ids] for v in vs])


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _insert(ks, vs, ids, k_new, v_new):
    # k_new, v_new: [L, n, H, BS, D] written to blocks `ids` of each layer's pool
    ks = tuple(k.at[ids].set(k_new[i]) for i, k in enumerate(ks))
    vs = tuple(v.at[ids].set(v_new[i]) for i, v in enumerate(vs))
    return ks, vs


def _heads_sharding(stage, ndim: int):
    if stage.mesh is None:
        return jax.devices()[0]
    spec = [None] * ndim
    spec[2] = shd.TP_AXIS  # [L, n, H, BS, D]: heads over tp
    return NamedSharding(stage.mesh, P(*spec))


def _put_ids(stage, ids: np.ndarray):
    return jnp.asarray(ids) if stage.mesh is None else jax.device_put(ids, shd.replicated(stage.mesh))


@dataclasses.dataclass(frozen=True)
class StagedKV:
    """A request's gathered blocks, still on the source devices: for each piece (start, end) of its
    block list, per source stage (first_layer, last_layer, k, v) with k, v [L_s, n, H, BS, D].
    These arrays no longer depend on the source pool, so later programs on the source instance
    neither wait for nor disturb them."""

    num_blocks: int
    pieces: tuple[tuple[int, int, tuple[tuple[int, int, jax.Array, jax.Array], ...]], ...]


def gather_request(src, src_table: list[int]) -> StagedKV:
    """Step 1: dispatch the gathers of a request's blocks on every source stage (asynchronous).
    Once dispatched, the source blocks may be freed: later writes to them are ordered after the
    gathers by the runtime."""
    out = []
    for a, b in pieces(len(src_table)):
        ids = np.asarray(src_table[a:b], np.int32)
        out.append((a, b, tuple((s.first_layer, s.last_layer, *_gather(s.cache.k, s.cache.v, _put_ids(s, ids))) for s in src.stages)))
    return StagedKV(num_blocks=len(src_table), pieces=tuple(out))


def insert_request(dst, dst_table: list[int], staged: StagedKV, *, wait: bool = True) -> int:
    """Steps 2 and 3: move the staged blocks onto each destination stage (resharding heads and
    regrouping layers) and insert them at `dst_table`. Returns the bytes moved; with `wait` the
    copy has landed on return."""
    if len(dst_table) < staged.num_blocks:
        raise ValueError(f"destination table has {len(dst_table)} blocks, source {staged.num_blocks}")
    moved = 0
    for a, b, parts in staged.pieces:
        dst_ids = np.asarray(dst_table[a:b], np.int32)
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
    if wait:
        for d in dst.stages:
            jax.block_until_ready(d.cache)
    return moved


def migrate(src, src_table: list[int], dst, dst_table: list[int]) -> int:
    """Copy a request's blocks from runner `src` to runner `dst` (same model); returns the bytes
    moved. Blocks up to len(src_table) are copied; the caller frees src blocks afterwards."""
    if src.block_size != dst.block_size:
        raise ValueError(f"block sizes differ: prefill block_size={src.block_size}, decode block_size={dst.block_size}")
    return insert_request(dst, dst_table, gather_request(src, src_table))


def staged_to_host(staged: StagedKV) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of staged K and V, [L, n, H, BS, D] each (all layers, all heads, blocks in
    order): one device-to-host copy. Safe on any thread: the staged arrays are independent of the
    source pool."""
    host = jax.device_get([[(first, k, v) for first, _, k, v in parts] for _, _, parts in staged.pieces])
    first = host[0][0][1]
    shape = (sum(k.shape[0] for _, k, _ in host[0]), staged.num_blocks, *first.shape[2:])
    k_out, v_out = np.empty(shape, first.dtype), np.empty(shape, first.dtype)
    for (a, b, _), parts in zip(staged.pieces, host):
        for layer, k, v in parts:
            k_out[layer : layer + k.shape[0], a:b] = k
            v_out[layer : layer + v.shape[0], a:b] = v
    return k_out, v_out


def export_blocks(src, src_table: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of a request's K and V, [L, n, H, BS, D] each (all layers, all heads, the
    blocks of `src_table` in order): the sending half of a transfer between processes. When this
    returns, the source blocks are no longer read."""
    return staged_to_host(gather_request(src, src_table))


def import_blocks(dst, dst_table: list[int], k: np.ndarray, v: np.ndarray) -> int:
    """Write host K and V ([L, n, H, BS, D], all layers and heads) into blocks dst_table[:n] of
    runner `dst`, resharding heads to each destination stage's mesh: the receiving half of a
    transfer between processes. Returns the bytes written; the write has landed on return."""
    n = k.shape[1]
    if len(dst_table) < n:
        raise ValueError(f"destination table has {len(dst_table)} blocks, the KV {n}")
    moved = 0
    for a, b in pieces(n):
        for d in dst.stages:
            target = _heads_sharding(d, 5)
            k_dst = jax.device_put(k[d.first_layer : d.last_layer, a:b], target)
            v_dst = jax.device_put(v[d.first_layer : d.last_layer, a:b], target)
            moved += k_dst.nbytes + v_dst.nbytes
            ids = _put_ids(d, np.asarray(dst_table[a:b], np.int32))
            new_k, new_v = _insert(d.cache.k, d.cache.v, ids, k_dst, v_dst)
            d.cache = type(d.cache)(k=new_k, v=new_v)
    for d in dst.stages:
        jax.block_until_ready(d.cache)
    return moved
