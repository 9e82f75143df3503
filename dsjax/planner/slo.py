"""SLOs and what a simulation (or a real benchmark) reports against them.

TTFT = first token time - arrival. TPOT = (last token time - first token time) / (output_len - 1);
a request with one output token has no TPOT (NaN) and meets the TPOT SLO trivially. Attainment is the
share of requests meeting the SLO; the joint attainment (`attainment`) requires both. A request that
could never be served (it does not fit in any KV cache) has infinite TTFT and misses both SLOs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SLO:
    ttft_s: float = math.inf
    tpot_s: float = math.inf

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLOs must be > 0 s, got ttft_s={self.ttft_s}, tpot_s={self.tpot_s}")

    def scaled(self, scale: float) -> "SLO":
        """Both SLOs multiplied by `scale` (the paper's "SLO scale")."""
        return SLO(ttft_s=self.ttft_s * scale, tpot_s=self.tpot_s * scale)


def _pct(x: np.ndarray, q: float) -> float:
    x = x[~np.isnan(x)]
    return float(np.percentile(x, q)) if len(x) else 0.0


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SimResult:
    """Per-request latencies (seconds) of one run and their summary against an SLO."""

    ttft_s: np.ndarray  # [N], inf for requests never served
    tpot_s: np.ndarray  # [N], NaN where output_len == 1
    slo: SLO
    makespan_s: float = 0.0
    num_output_tokens: int = 0

    @classmethod
    def from_times(
        cls,
        *,
        arrival_s: np.ndarray,
        first_token_s: np.ndarray,
        finish_s: np.ndarray,
        output_len: np.ndarray,
        slo: SLO,
    ) -> "SimResult":
        ttft = first_token_s - arrival_s
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(output_len > 1, (finish_s - first_token_s) / np.maximum(output_len - 1, 1), np.nan)
        tpot = np.where(np.isinf(ttft), np.inf, tpot)
        done = finish_s[np.isfinite(finish_s)]
        makespan = float(done.max() - arrival_s.min()) if len(done) else 0.0
        return cls(ttft_s=ttft, tpot_s=tpot, slo=slo, makespan_s=makespan, num_output_tokens=int(output_len.sum()))

    @property
    def num_requests(self) -> int:
        return len(self.ttft_s)

    def _ttft_ok(self) -> np.ndarray:
        return self.ttft_s <= self.slo.ttft_s

    def _tpot_ok(self) -> np.ndarray:
        return np.isnan(self.tpot_s) | (self.tpot_s <= self.slo.tpot_s)

    @property
    def ttft_attainment(self) -> float:
        return float(self._ttft_ok().mean()) if self.num_requests else 1.0

    @property
    def tpot_attainment(self) -> float:
        return float(self._tpot_ok().mean()) if self.num_requests else 1.0

    @property
    def attainment(self) -> float:
        """Share of requests meeting both SLOs."""
        return float((self._ttft_ok() & self._tpot_ok()).mean()) if self.num_requests else 1.0

    def tail_attainment(self, fraction: float) -> float:
        """Joint attainment of the last `fraction` of requests by arrival (requests are stored in
        arrival order). Under overload queues grow, so the last arrivals fare worst: a stability
        check that a short trace's lenient start cannot hide."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must be in (0, 1]")
        n = self.num_requests
        if n == 0:
            return 1.0
        start = n - max(1, int(round(n * fraction)))
        ok = (self.ttft_s[start:] <= self.slo.ttft_s) & (np.isnan(self.tpot_s[start:]) | (self.tpot_s[start:] <= self.slo.tpot_s))
        return float(ok.mean())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_requests": self.num_requests,
            "attainment": self.attainment,
            "ttft_attainment": self.ttft_attainment,
            "tpot_attainment": self.tpot_attainment,
            "ttft_slo_s": self.slo.ttft_s,
            "tpot_slo_s": self.slo.tpot_s,
            "num_unserved": int(np.isinf(self.ttft_s).sum()),
            "makespan_s": self.makespan_s,
            "throughput_tokens_per_s": self.num_output_tokens / self.makespan_s if self.makespan_s > 0 else 0.0,
        }
        for name, arr in (("ttft", self.ttft_s), ("tpot", self.tpot_s)):
            finite = arr[np.isfinite(arr)]
            out[f"{name}_mean_s"] = float(finite.mean()) if len(finite) else 0.0
            for q in (50, 90, 99):
                out[f"{name}_p{q}_s"] = _pct(np.where(np.isinf(arr), np.nan, arr), q) if len(finite) else 0.0
        return out
