"""Placing weights tensor by tensor, straight onto the devices that hold them.

A weight goes from a host array, or a view of one (a memory-mapped checkpoint tensor, its
transpose, a broadcast constant), to its devices with `place`: `jax.make_array_from_callback` asks
for each device's block, which is sliced out of the view and converted on its own, so the host
holds at most one tensor's converted copy at a time and no device ever receives more than its
shard.

Where each weight goes is a nested mapping shaped like the params tree (models/transformer.py)
whose leaves are `jax.sharding.Sharding`s. It may cover any subset of the tree: weights outside it
are not made at all (a pipeline stage holds only its layers). `shardings=None` means every weight,
on the default device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

TreePath = tuple[str, ...]
Shardings = Mapping[str, Any]  # nested like the params tree; leaves are jax.sharding.Sharding


def lookup(shardings: Shardings | None, path: TreePath) -> tuple[bool, jax.sharding.Sharding | None]:
    """(wanted, sharding) of the weight at `path`: (True, None) for every weight when `shardings` is
    None (default device); (False, None) when the mapping does not cover `path`."""
    if shardings is None:
        return True, None
    node: Any = shardings
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    if not isinstance(node, jax.sharding.Sharding):
        raise ValueError(f"shardings at {'/'.join(path)} is {type(node).__name__}, not a jax.sharding.Sharding")
    return True, node


# Block alignment: the CPU client adopts a 64-byte-aligned host buffer as the device buffer instead
# of copying it, so on CPU each block is allocated once (no second copy, no freed temporaries
# fragmenting the heap); other platforms copy it to the device and free it.
_ALIGN = 64


def _block(view: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A fresh C-contiguous, 64-byte-aligned copy of `view` cast to `dtype`."""
    nbytes = int(np.prod(view.shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    out = raw[start : start + nbytes].view(dtype).reshape(view.shape)
    np.copyto(out, view, casting="unsafe")
    return out


def place(host: np.ndarray, sharding: jax.sharding.Sharding | None, dtype: Any) -> jax.Array:
    """`host` (an array or any view of one) as a `dtype` jax.Array with `sharding` (None: the
    default device). Each device's block is copied out of `host` by itself, so a view of a memory
    map reads only the bytes that device needs, and the result never aliases `host`."""
    dtype = np.dtype(dtype)
    if sharding is None:
        return jax.device_put(_block(host, dtype))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: _block(host[index], dtype))


def insert(tree: dict, path: TreePath, value: Any) -> None:
    """tree[path[0]]...[path[-1]] = value, making the intermediate dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
