"""Model and device facts the planner needs: shapes for parallelism constraints, bytes for memory.

`MemoryModel.kv_capacity_tokens(tp, pp)` answers "does this (TP, PP) instance fit, and how many
tokens of KV cache does it hold?". It reads DistServe's `max_num_tokens.csv` when the model is in
it (a configuration absent from the file does not fit) and otherwise estimates:

    per device:  usable = memory * gpu_memory_utilization - weight_bytes / (tp * pp)
    instance:    tokens = usable * tp * pp / kv_bytes_per_token       (None when usable <= 0)

where kv_bytes_per_token = 2 (K and V) * layers * kv_heads * head_dim * dtype_bytes. With
utilisation 0.92 the estimate lands within ~5% of DistServe's A100-80GB table for OPT-13B/66B.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Mapping

GIB = 1 << 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Shapes of one decoder-only transformer (dense attention; GQA through num_kv_heads)."""

    name: str  # our preset name, e.g. "opt-13b"
    hf_name: str  # the name profiles and max_num_tokens.csv use, e.g. "facebook/opt-13b"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    ffn_size: int
    vocab_size: int
    num_params: float
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_heads", "num_kv_heads", "hidden_size", "ffn_size", "vocab_size", "dtype_bytes"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)} must be >= 1 for model {self.name!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.hidden_size=} % {self.num_heads=} and num_heads % {self.num_kv_heads=} must be 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes


def _opt(name: str, layers: int, heads: int, hidden: int, params: float) -> ModelSpec:
    return ModelSpec(
        name=name, hf_name=f"facebook/{name}", num_layers=layers, num_heads=heads, num_kv_heads=heads,
        hidden_size=hidden, ffn_size=4 * hidden, vocab_size=50272, num_params=params,
    )


def _small(name: str, *, layers: int, heads: int, kv_heads: int, hidden: int, ffn: int, params: float) -> ModelSpec:
    return ModelSpec(
        name=name, hf_name=name, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, hidden_size=hidden,
        ffn_size=ffn, vocab_size=512, num_params=params, dtype_bytes=4,
    )


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _opt("opt-6.7b", 32, 32, 4096, 6.66e9),
        _opt("opt-13b", 40, 40, 5120, 12.85e9),
        _opt("opt-30b", 48, 56, 7168, 29.97e9),
        _opt("opt-66b", 64, 72, 9216, 65.7e9),
        _opt("opt-175b", 96, 96, 12288, 174.6e9),
        ModelSpec(name="llama-2-7b", hf_name="meta-llama/Llama-2-7b-hf", num_layers=32, num_heads=32, num_kv_heads=32,
                  hidden_size=4096, ffn_size=11008, vocab_size=32000, num_params=6.74e9),
        ModelSpec(name="llama-2-13b", hf_name="meta-llama/Llama-2-13b-hf", num_layers=40, num_heads=40, num_kv_heads=40,
                  hidden_size=5120, ffn_size=13824, vocab_size=32000, num_params=13.02e9),
        ModelSpec(name="llama-2-70b", hf_name="meta-llama/Llama-2-70b-hf", num_layers=80, num_heads=64, num_kv_heads=8,
                  hidden_size=8192, ffn_size=28672, vocab_size=32000, num_params=68.98e9),
        ModelSpec(name="llama-3-8b", hf_name="meta-llama/Meta-Llama-3-8B", num_layers=32, num_heads=32, num_kv_heads=8,
                  hidden_size=4096, ffn_size=14336, vocab_size=128256, num_params=8.03e9),
        # The engine's test and CPU-benchmark presets (models/config.py), for profiles measured by
        # `python -m dsjax.plan profile`; their profile key is the preset name.
        _small("tiny-opt", layers=2, heads=4, kv_heads=4, hidden=64, ffn=128, params=131_200),
        _small("tiny-llama", layers=2, heads=4, kv_heads=2, hidden=64, ffn=128, params=139_264),
        _small("small-llama", layers=4, heads=8, kv_heads=4, hidden=256, ffn=768, params=3_407_872),
        _small("small-opt", layers=4, heads=8, kv_heads=8, hidden=256, ffn=1024, params=3_801_600),
        # The bandwidth-bound CPU benchmark model (float32: 500 MB of weights), keyed by preset
        # name like the small ones, since profiles of it are measured on this engine.
        ModelSpec(name="opt-125m", hf_name="opt-125m", num_layers=12, num_heads=12, num_kv_heads=12, hidden_size=768,
                  ffn_size=3072, vocab_size=50272, num_params=125_117_952, dtype_bytes=4),
    )
}
_BY_HF_NAME = {m.hf_name.lower(): m for m in MODELS.values()}


def get_model(name: str) -> ModelSpec:
    """Look up a preset by our name ("opt-13b") or its HF name ("facebook/opt-13b")."""
    m = MODELS.get(name.lower()) or _BY_HF_NAME.get(name.lower())
    if m is None:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return m


def canonical_model_name(name: str) -> str:
    """"opt-13b" -> "facebook/opt-13b" (the key profiles use); unknown names pass through."""
    m = MODELS.get(name.lower()) or _BY_HF_NAME.get(name.lower())
    return m.hf_name if m else name


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    name: str
    memory_bytes: float

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes={self.memory_bytes} must be > 0")


DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        DeviceSpec(name="a100-80g", memory_bytes=80 * GIB),
        DeviceSpec(name="a100-40g", memory_bytes=40 * GIB),
        DeviceSpec(name="h100-80g", memory_bytes=80 * GIB),
        DeviceSpec(name="h200", memory_bytes=141e9),
    )
}


def get_device(name: str) -> DeviceSpec:
    if name.lower() not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)}")
    return DEVICES[name.lower()]


KvTable = Mapping[str, Mapping[tuple[int, int], int]]


def read_max_num_tokens(path: str | Path) -> dict[str, dict[tuple[int, int], int]]:
    """Read `model,tp,pp,max_num_tokens` rows into {model: {(tp, pp): tokens}}."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"max_num_tokens file {str(p)!r} does not exist")
    table: dict[str, dict[tuple[int, int], int]] = {}
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"model", "tp", "pp", "max_num_tokens"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ValueError(f"{p}: header {reader.fieldnames} must contain {sorted(need)}")
        for lineno, row in enumerate(reader, start=2):
            try:
                key = (int(row["tp"]), int(row["pp"]))
                table.setdefault(row["model"], {})[key] = int(row["max_num_tokens"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{p}:{lineno}: bad row {row}: {e}") from e
    return table


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class MemoryModel:
    """KV-cache capacity per (tp, pp) instance of `model` on `device`."""

    model: ModelSpec
    device: DeviceSpec = DEVICES["a100-80g"]
    table: KvTable | None = None
    gpu_memory_utilization: float = 0.92

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")

    def _table_rows(self) -> Mapping[tuple[int, int], int] | None:
        if not self.table:
            return None
        for key in (self.model.hf_name, self.model.name):
            if key in self.table:
                return self.table[key]
        return None

    def estimate_tokens(self, tp: int, pp: int) -> int | None:
        usable = self.device.memory_bytes * self.gpu_memory_utilization - self.model.weight_bytes / (tp * pp)
        if usable <= 0:
            return None
        return int(usable * tp * pp // self.model.kv_bytes_per_token)

    def kv_capacity_tokens(self, tp: int, pp: int) -> int | None:
        """Tokens of KV one instance holds, or None if the weights do not fit."""
        rows = self._table_rows()
        if rows is not None:
            return rows.get((tp, pp))
        return self.estimate_tokens(tp, pp)


def parallel_config_error(model: ModelSpec, *, tp: int, pp: int, gpus_per_node: int | None = None) -> str | None:
    """Why (tp, pp) is not a legal split of `model`, or None: TP divides heads (and KV heads),
    PP divides layers, TP fits in one node."""
    if tp < 1 or pp < 1:
        return f"tp={tp} and pp={pp} must be >= 1"
    if model.num_heads % tp:
        return f"tp={tp} does not divide num_heads={model.num_heads}"
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        return f"tp={tp} and num_kv_heads={model.num_kv_heads} do not divide one another"
    if model.num_layers % pp:
        return f"pp={pp} does not divide num_layers={model.num_layers}"
    if gpus_per_node is not None and tp > gpus_per_node:
        return f"tp={tp} exceeds gpus_per_node={gpus_per_node}"
    return None
