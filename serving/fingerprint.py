"""The weights' fingerprint a worker registers with (the router refuses one that differs).

Cheap and deterministic, computed from what every process of the cluster can see without loading
the weights:

- dummy weights (presets, `--dummy-weights`): "dummy", the model's config and the seed (random
  init is a function of those);
- a checkpoint folder: config.json, then for each *.safetensors file (sorted by name) its name,
  size, the whole header (every tensor's name, dtype, shape and byte offsets) and three 4 KiB
  samples of its data (start, middle, end). A few pages per file, never the weights themselves:
  it tells apart other checkpoints and other shapes, and almost any retrained or re-quantized copy,
  but it is a consistency check between operators' processes, not a proof against someone who
  crafts a file with the same samples.

xxh3-64, as "xxh3:<16 hex digits>".
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import xxhash

SAMPLE_BYTES = 4096


def weights_fingerprint(model: str, *, dummy_weights: bool, seed: int = 0) -> str | None:
    """The fingerprint of `model`'s weights as `load_causal_lm` would load them; None when a
    checkpoint folder has no safetensors here (a router host holding only config and tokenizer)."""
    h = xxhash.xxh3_64()
    path = Path(model)
    if dummy_weights or not path.is_dir():
        from serving.validation import model_config

        config = model_config(model)
        h.update(f"dummy|seed={seed}|{sorted(dataclasses.asdict(config).items())!r}".encode())
        return f"xxh3:{h.hexdigest()}"
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    config = path / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    for f in files:
        _file_digest(h, f)
    return f"xxh3:{h.hexdigest()}"


def _file_digest(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"|{path.name}|{size}|".encode())
    with open(path, "rb") as fh:
        head = fh.read(8)
        (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        header_len = min(header_len, max(0, size - 8))
        h.update(head + fh.read(header_len))
        start = 8 + header_len
        data = size - start
        for offset in sorted({start, start + max(0, data // 2 - SAMPLE_BYTES // 2), max(start, size - SAMPLE_BYTES)}):
            fh.seek(offset)
            h.update(fh.read(SAMPLE_BYTES))
