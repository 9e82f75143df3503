"""Where each phase runs: per-phase parallelism and replica counts.

`Placement` is the contract between the planner (which writes it to a plan file), the launcher
(`python -m dsjax.serve --plan FILE`) and the engine (which carves `jax.devices()` into one mesh per
instance). Plain Python: no jax import, so the planner and schedulers stay device-free.

Device accounting: an instance with tensor-parallel degree `tp` and pipeline degree `pp` uses
`tp * pp` devices; a phase with `replicas` instances uses `tp * pp * replicas`. In disaggregated mode
the prefill and decode phases hold disjoint devices; in colocated and chunked modes only `prefill`
is used (one instance runs both phases) and `decode` must equal it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Mode = Literal["disaggregated", "colocated", "chunked"]
MODES: tuple[str, ...] = ("disaggregated", "colocated", "chunked")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseParallel:
    """Parallelism of one phase: every instance of the phase has the same (tp, pp).

    `devices`, when given, lists explicit device ids per instance (len == replicas, each of length
    tp * pp, stage-major: the first `tp` ids form pipeline stage 0). Otherwise the engine assigns
    devices in order.
    """

    tp: int = 1
    pp: int = 1
    replicas: int = 1
    devices: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.devices is not None:
            devs = tuple(tuple(int(d) for d in inst) for inst in self.devices)
            object.__setattr__(self, "devices", devs)
            if len(devs) != self.replicas:
                raise ValueError(f"devices lists {len(devs)} instances but replicas={self.replicas}")
            for inst in devs:
                if len(inst) != self.devices_per_instance:
                    raise ValueError(
                        f"an instance lists {len(inst)} devices {inst}, expected tp*pp={self.devices_per_instance}"
                    )
            flat = [d for inst in devs for d in inst]
            if len(set(flat)) != len(flat):
                raise ValueError(f"devices {devs} repeat a device id")

    @property
    def devices_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def num_devices(self) -> int:
        return self.devices_per_instance * self.replicas

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tp": self.tp, "pp": self.pp, "replicas": self.replicas}
        if self.devices is not None:
            d["devices"] = [list(inst) for inst in self.devices]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhaseParallel":
        unknown = set(d) - {"tp", "pp", "replicas", "devices"}
        if unknown:
            raise ValueError(f"unknown phase fields {sorted(unknown)}")
        devices = d.get("devices")
        return cls(
            tp=d.get("tp", 1),
            pp=d.get("pp", 1),
            replicas=d.get("replicas", 1),
            devices=None if devices is None else tuple(tuple(x) for x in devices),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
    """Per-phase parallelism plus the serving mode it was planned for."""

    prefill: PhaseParallel = PhaseParallel()
    decode: PhaseParallel = PhaseParallel()
    mode: str = "disaggregated"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.mode != "disaggregated" and self.decode != self.prefill:
            raise ValueError(
                f"mode={self.mode!r} runs both phases on one instance: decode={self.decode} must equal prefill={self.prefill}"
            )
        if self.mode == "disaggregated" and self.prefill.devices and self.decode.devices:
            shared = {d for i in self.prefill.devices for d in i} & {d for i in self.decode.devices for d in i}
            if shared:
                raise ValueError(f"prefill and decode devices overlap: {sorted(shared)}")

    @classmethod
    def colocated(cls, *, tp: int = 1, pp: int = 1, replicas: int = 1, mode: str = "colocated") -> "Placement":
        phase = PhaseParallel(tp=tp, pp=pp, replicas=replicas)
        return cls(prefill=phase, decode=phase, mode=mode)

    @property
    def num_devices(self) -> int:
        if self.mode == "disaggregated":
            return self.prefill.num_devices + self.decode.num_devices
        return self.prefill.num_devices

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "prefill": self.prefill.to_dict(), "decode": self.decode.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Placement":
        unknown = set(d) - {"mode", "prefill", "decode"}
        if unknown:
            raise ValueError(f"unknown placement fields {sorted(unknown)}")
        prefill = PhaseParallel.from_dict(d.get("prefill", {}))
        decode = PhaseParallel.from_dict(d["decode"]) if "decode" in d else prefill
        return cls(prefill=prefill, decode=decode, mode=d.get("mode", "disaggregated"))


def save_plan(path: str | Path, placement: Placement, **metadata: Any) -> None:
    """Write a plan file: {"placement": {...}, "metadata": {...}} (JSON)."""
    Path(path).write_text(json.dumps({"placement": placement.to_dict(), "metadata": metadata}, indent=2) + "\n")


def load_plan(path: str | Path) -> tuple[Placement, dict[str, Any]]:
    """Read a plan file written by `save_plan`; raises ValueError naming what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"plan file {str(p)!r} does not exist")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"plan file {str(p)!r} is not JSON: {e}") from e
    if not isinstance(doc, dict) or "placement" not in doc:
        raise ValueError(f"plan file {str(p)!r} has no 'placement' object")
    return Placement.from_dict(doc["placement"]), dict(doc.get("metadata", {}))
