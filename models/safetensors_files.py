"""Reading safetensors checkpoint files without loading them: which file holds each tensor, and
each tensor as a memory map of its own bytes (models/weights.py converts and places them).

The format: an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
shape and [begin, end) byte offsets in the data that follows, row-major and little-endian. The
numpy backend of `safetensors` has no bfloat16; mapping the bytes ourselves (ml_dtypes provides
the type) reads every dtype the same way, and lets a sharded load touch only the bytes each
device's block needs.
"""

from __future__ import annotations

import functools
import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the shard index or by listing each file's header."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        located = {name: model_dir / fname for name, fname in weight_map.items()}
        missing_files = sorted({str(p) for p in located.values() if not p.is_file()})
        if missing_files:
            raise ValueError(f"{index} names shard files that do not exist: {missing_files}")
        return located
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {others}: convert PyTorch pickles to safetensors first)" if others else ""
        raise ValueError(f"no *.safetensors files in {model_dir}{hint}")
    located: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                if name in located:
                    raise ValueError(f"tensor {name!r} appears in both {located[name]} and {path}")
                located[name] = path
    return located


@functools.lru_cache(maxsize=16)
def header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header JSON) of a safetensors file."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return 8 + size, json.loads(fh.read(size))


# Safetensors dtype names -> numpy (the format is little-endian, row-major); numpy's safetensors
# backend has no bfloat16, ml_dtypes provides it.
_FILE_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}


def tensor_info(path: Path, name: str) -> dict[str, Any]:
    tensors = header(path)[1]
    if name not in tensors or name == "__metadata__":
        raise ValueError(f"{path.name}: holds no tensor {name!r} (the shard index says it does)")
    return tensors[name]


def map_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor as a read-only memory map of its bytes in the file: nothing is read until it is
    sliced, and the mapping (its pages in this process's RSS included) goes when the last view of
    it is dropped."""
    start, _ = header(path)
    info = tensor_info(path, name)
    dtype, shape = _FILE_DTYPES.get(info["dtype"]), tuple(info["shape"])
    if dtype is None:
        raise ValueError(f"{path.name}: tensor {name!r} is {info['dtype']}; weights must be one of {sorted(_FILE_DTYPES)}")
    begin, end = info["data_offsets"]
    if end - begin != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{path.name}: tensor {name!r} spans {end - begin} bytes, not those of {info['dtype']} {shape}")
    if end == begin:
        return np.zeros(shape, dtype)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return raw.view(dtype).reshape(shape)


def by_file(located: dict[str, Path]) -> Iterator[tuple[Path, list[str]]]:
    groups: dict[Path, list[str]] = defaultdict(list)
    for name, path in located.items():
        groups[path].append(name)
    yield from sorted(groups.items())
