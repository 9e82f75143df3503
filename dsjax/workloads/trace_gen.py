"""Request traces: seeded arrival times at a rate, written as JSON Lines.

One request a line, keys in this order: {"arrival_s": float, "prompt_len": int, "output_len": int}.
Arrivals: the first request at `start_s`, then i.i.d. gaps with mean 1/rate. "poisson" draws
exponential gaps; "gamma" draws gamma gaps with shape 1/cv**2 and scale cv**2/rate, so the gaps'
coefficient of variation is `cv` (cv > 1 is burstier than Poisson, cv = 1 is Poisson, cv < 1 is
smoother).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ARRIVAL_PROCESSES = ("poisson", "gamma")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceConfig:
    rate: float  # requests per second
    arrival: str = "poisson"
    cv: float = 1.0  # gaps' coefficient of variation; only for "gamma"
    seed: int = 0
    start_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"{self.rate=} must be a finite rate > 0 (requests per second)")
        if self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(f"{self.arrival=} must be one of {ARRIVAL_PROCESSES}")
        if not (math.isfinite(self.cv) and self.cv > 0):
            raise ValueError(f"{self.cv=} must be finite and > 0")
        if self.arrival == "poisson" and self.cv != 1.0:
            raise ValueError(f"{self.cv=} is only for arrival='gamma'; Poisson gaps have cv 1")
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"{self.start_s=} must be finite and >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceEntry:
    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"{self.arrival_s=} must be finite and >= 0")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"{self.prompt_len=} and {self.output_len=} must both be >= 1")

    def to_json(self) -> str:
        return json.dumps({"arrival_s": self.arrival_s, "prompt_len": self.prompt_len, "output_len": self.output_len})


def arrival_times(num_requests: int, config: TraceConfig) -> list[float]:
    """Seeded arrival times in seconds, non-decreasing, the first at `config.start_s`."""
    if num_requests < 0:
        raise ValueError(f"{num_requests=} must be >= 0")
    if num_requests == 0:
        return []
    rng = np.random.default_rng(config.seed)
    if config.arrival == "poisson":
        gaps = rng.exponential(1.0 / config.rate, size=num_requests - 1)
    else:
        shape = 1.0 / config.cv**2
        gaps = rng.gamma(shape, 1.0 / (shape * config.rate), size=num_requests - 1)
    times = config.start_s + np.concatenate([[0.0], np.cumsum(gaps)])
    return [float(t) for t in times]


def make_trace(lengths: Sequence[tuple[int, int]], config: TraceConfig) -> list[TraceEntry]:
    """Pairs each (prompt_len, output_len), in order, with the next arrival time."""
    times = arrival_times(len(lengths), config)
    return [TraceEntry(arrival_s=t, prompt_len=int(p), output_len=int(o)) for t, (p, o) in zip(times, lengths)]


def write_trace(path: str | Path, entries: Sequence[TraceEntry]) -> None:
    """Writes one JSON object a line."""
    with open(path, "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(entry.to_json() + "\n")


def read_trace(path: str | Path) -> list[TraceEntry]:
    entries = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            item = json.loads(line)
            try:
                entries.append(
                    TraceEntry(
                        arrival_s=float(item["arrival_s"]),
                        prompt_len=int(item["prompt_len"]),
                        output_len=int(item["output_len"]),
                    )
                )
            except (KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: bad trace line {line.strip()!r}") from err
    return entries
