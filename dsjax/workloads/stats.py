"""Summary statistics of a workload's lengths (mean / median / p90 of prompt and output)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthStats:
    num_requests: int
    prompt_mean: float
    prompt_median: float
    prompt_p90: float
    prompt_max: int
    output_mean: float
    output_median: float
    output_p90: float
    output_max: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def format(self, title: str = "") -> str:
        head = f"{title}: " if title else ""
        return (
            f"{head}{self.num_requests} requests | prompt mean {self.prompt_mean:.1f} median "
            f"{self.prompt_median:.0f} p90 {self.prompt_p90:.0f} max {self.prompt_max} | output mean "
            f"{self.output_mean:.1f} median {self.output_median:.0f} p90 {self.output_p90:.0f} max {self.output_max}"
        )


def length_stats(pairs: Sequence[tuple[int, int]]) -> LengthStats:
    """Stats of (prompt_len, output_len) pairs; percentiles interpolate linearly (numpy's default)."""
    if not pairs:
        raise ValueError("length_stats needs at least one (prompt_len, output_len) pair, got none")
    lengths = np.asarray(pairs, dtype=np.int64)
    if lengths.ndim != 2 or lengths.shape[1] != 2:
        raise ValueError(f"expected (prompt_len, output_len) pairs, got an array of shape {lengths.shape}")
    prompt, output = lengths[:, 0], lengths[:, 1]
    return LengthStats(
        num_requests=len(lengths),
        prompt_mean=float(prompt.mean()),
        prompt_median=float(np.median(prompt)),
        prompt_p90=float(np.percentile(prompt, 90)),
        prompt_max=int(prompt.max()),
        output_mean=float(output.mean()),
        output_median=float(np.median(output)),
        output_p90=float(np.percentile(output, 90)),
        output_max=int(output.max()),
    )
