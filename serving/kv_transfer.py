"""A request's KV on the wire: host arrays <-> a stream of `KVChunk` messages (no jax).

The sender (prefill worker) exports the request's blocks to host memory once
(the runner's `export_kv`, `dsjax.runtime.migration.export_blocks` on devices: all layers, all heads, [L, n, H, BS, D] for K and for V: the pool's head-major blocks) and
cuts them into chunks, each a layer group x block range of at most `max_chunk_bytes` (K + V):

    layers 0..L-1, blocks 0..n-1  ->  [layers 0..a) x all blocks] [layers a..b) x all blocks] ...
    (a single layer larger than the limit is cut along blocks as well)

Each chunk carries the request's `KVDescriptor`, the layout name, its coordinates and an xxh3-64
checksum of its bytes, so the receiver (decode worker) can preallocate and fill in any order, check
that it has everything and that nothing was corrupted on the way (a mismatch fails the pull, and
the request is recomputed: no token is ever decoded from corrupted KV), and re-page when the two
sides use different block sizes (the KV is re-cut at token granularity
on the host). Resharding heads to the receiver's tensor-parallel degree happens on the device
put (`dsjax.runtime.migration.import_blocks`).
"""

from __future__ import annotations

from typing import Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
import xxhash

from dsjax.runtime.kv_descriptor import KVDescriptor
from serving.proto.dsjax.v1 import worker_pb2 as wpb

LAYOUT = "LNHSD"  # layer, block, kv head, slot in block, head dim (the pool's block layout)
DEFAULT_CHUNK_BYTES = 1 << 20  # fastest on loopback of 0.25-16 MiB (docs/serving.md)


def descriptor_to_proto(d: KVDescriptor) -> wpb.KVDescriptor:
    return wpb.KVDescriptor(num_layers=d.num_layers, num_kv_heads=d.num_kv_heads, head_dim=d.head_dim,
                            block_size=d.block_size, num_tokens=d.num_tokens, dtype=d.dtype)


def descriptor_from_proto(m: wpb.KVDescriptor) -> KVDescriptor:
    return KVDescriptor(num_layers=m.num_layers, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                        block_size=m.block_size, num_tokens=m.num_tokens, dtype=m.dtype)


def _block_bytes(d: KVDescriptor) -> int:
    """K + V bytes of one block of one layer."""
    return 2 * d.block_size * d.num_kv_heads * d.head_dim * np.dtype(d.dtype).itemsize


def chunk_plan(d: KVDescriptor, max_chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """(first_layer, num_layers, first_block, num_blocks) of each chunk, covering [L] x [n]."""
    n, per_block = d.num_blocks, _block_bytes(d)
    if n == 0:
        return []
    layer_bytes = n * per_block
    if layer_bytes <= max_chunk_bytes:
        group = max(1, max_chunk_bytes // layer_bytes)
        return [(l, min(group, d.num_layers - l), 0, n) for l in range(0, d.num_layers, group)]
    blocks = max(1, max_chunk_bytes // per_block)
    return [(l, 1, b, min(blocks, n - b)) for l in range(d.num_layers) for b in range(0, n, blocks)]


def to_chunks(d: KVDescriptor, k: np.ndarray, v: np.ndarray, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[wpb.KVChunk]:
    """Chunks of host K and V ([L, n, H, BS, D] each, as `export_blocks` returns them)."""
    expect = (d.num_layers, d.num_blocks, d.num_kv_heads, d.block_size, d.head_dim)
    if k.shape != expect or v.shape != expect:
        raise ValueError(f"K/V shapes {k.shape}, {v.shape} do not match the descriptor's {expect}")
    desc = descriptor_to_proto(d)
    plan = chunk_plan(d, max_chunk_bytes)
    for i, (l, nl, b, nb) in enumerate(plan):
        kb = np.ascontiguousarray(k[l : l + nl, b : b + nb]).tobytes()
        vb = np.ascontiguousarray(v[l : l + nl, b : b + nb]).tobytes()
        yield wpb.KVChunk(kv=desc, layout=LAYOUT, first_layer=l, num_layers=nl, first_block=b, num_blocks=nb,
                          k=kb, v=vb, index=i, count=len(plan), checksum=checksum(kb, vb))


def checksum(k: bytes, v: bytes) -> int:
    """xxh3-64 of a chunk's K bytes then its V bytes (~20 GB/s on one core: a few percent of a
    gRPC transfer's cost, where zlib's CRC-32 would be ~20%)."""
    h = xxhash.xxh3_64()
    h.update(k)
    h.update(v)
    return h.intdigest()


class ChecksumMismatch(ValueError):
    """A chunk whose bytes do not hash to its checksum: corrupted in transit."""


class KVAssembler:
    """Collects one request's chunks into preallocated host arrays; `arrays()` when complete."""

    def __init__(self, d: KVDescriptor):
        self.descriptor = d
        shape = (d.num_layers, d.num_blocks, d.num_kv_heads, d.block_size, d.head_dim)
        self.k = np.empty(shape, np.dtype(d.dtype))
        self.v = np.empty(shape, np.dtype(d.dtype))
        self.bytes = 0
        self._seen: set[int] = set()
        self._count: int | None = None

    def add(self, chunk: wpb.KVChunk) -> None:
        d = self.descriptor
        if descriptor_from_proto(chunk.kv) != d:
            raise ValueError(f"chunk {chunk.index} describes {descriptor_from_proto(chunk.kv)}, expected {d}")
        if chunk.layout != LAYOUT:
            raise ValueError(f"chunk layout {chunk.layout!r} is not {LAYOUT!r}")
        l, nl, b, nb = chunk.first_layer, chunk.num_layers, chunk.first_block, chunk.num_blocks
        if not (0 <= l and nl > 0 and l + nl <= d.num_layers and 0 <= b and nb > 0 and b + nb <= d.num_blocks):
            raise ValueError(f"chunk {chunk.index} covers layers [{l}, {l + nl}) x blocks [{b}, {b + nb}), outside {d}")
        shape = (nl, nb, d.num_kv_heads, d.block_size, d.head_dim)
        want = int(np.prod(shape)) * self.k.itemsize
        if len(chunk.k) != want or len(chunk.v) != want:
            raise ValueError(f"chunk {chunk.index} holds {len(chunk.k)} + {len(chunk.v)} bytes, expected {want} each for {shape}")
        if checksum(chunk.k, chunk.v) != chunk.checksum:
            raise ChecksumMismatch(f"chunk {chunk.index} fails its checksum: the KV was corrupted in transit")
        self.k[l : l + nl, b : b + nb] = np.frombuffer(chunk.k, self.k.dtype).reshape(shape)
        self.v[l : l + nl, b : b + nb] = np.frombuffer(chunk.v, self.v.dtype).reshape(shape)
        self.bytes += 2 * want
        self._seen.add(chunk.index)
        self._count = chunk.count

    @property
    def complete(self) -> bool:
        if self.descriptor.num_blocks == 0:
            return True
        return self._count is not None and len(self._seen) == self._count

    def arrays(self, block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """K and V, re-paged to `block_size` rows per block when it differs from the sender's."""
        if not self.complete:
            raise ValueError(f"KV incomplete: got chunks {sorted(self._seen)} of {self._count}")
        if block_size is None or block_size == self.descriptor.block_size:
            return self.k, self.v
        return repage(self.k, self.descriptor.num_tokens, block_size), repage(self.v, self.descriptor.num_tokens, block_size)


def repage(x: np.ndarray, num_tokens: int, block_size: int) -> np.ndarray:
    """[L, n, H, BS, D] -> [L, n', H, block_size, D] holding the same first `num_tokens` rows
    (re-cut in token order: [L, H, tokens, D] in between)."""
    L, n_old, H, bs, D = x.shape
    rows = x.transpose(0, 2, 1, 3, 4).reshape(L, H, n_old * bs, D)[:, :, :num_tokens]
    n = -(-num_tokens // block_size)
    out = np.zeros((L, H, n * block_size, D), x.dtype)
    out[:, :, :num_tokens] = rows
    return out.reshape(L, H, n, block_size, D).transpose(0, 2, 1, 3, 4)
