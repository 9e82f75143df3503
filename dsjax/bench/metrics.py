"""Serving-benchmark metrics: pure functions over per-request records (no jax, no I/O but writers).

Definitions (DistServe §2 and docs/distserve-facts.md "Metrics"):
  TTFT  = first token's receive time - send time.
  TPOT  = (last token's time - first token's time) / (n_tokens - 1); it excludes TTFT. A request
          with a single output token has no TPOT and meets any TPOT SLO.
  ITL   = gaps between consecutive tokens. Tokens that arrive together in one message all carry
          that message's time, so a message of k tokens contributes k - 1 zero gaps.
  E2E   = last token's time - send time.
A request *fails* when it has an error or received no token; a failed request misses every SLO
and is left out of the latency percentiles (which describe served requests only).

Example: sent at 0.0, messages at 0.5 (1 token), 0.7 (2 tokens), 1.1 (1 token)
  token_times_s = (0.5, 0.7, 0.7, 1.1); TTFT 0.5; TPOT (1.1 - 0.5) / 3 = 0.2; ITL (0.2, 0.0, 0.4).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestRecord:
    """What a benchmark client saw for one request; times in seconds on one clock."""

    send_s: float
    token_times_s: tuple[float, ...]  # one entry per output token received, non-decreasing
    prompt_len: int
    output_len: int  # tokens requested (max_tokens)
    error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_times_s", tuple(float(t) for t in self.token_times_s))
        times = self.token_times_s
        if not math.isfinite(self.send_s):
            raise ValueError(f"{self.send_s=} must be finite")
        if any(not math.isfinite(t) for t in times):
            raise ValueError(f"token times must be finite, got {times}")
        if times and times[0] < self.send_s:
            raise ValueError(f"first token at {times[0]} precedes {self.send_s=}")
        if any(b < a for a, b in zip(times, times[1:])):
            raise ValueError(f"token times must be non-decreasing, got {times}")
        if self.prompt_len < 0 or self.output_len < 0:
            raise ValueError(f"{self.prompt_len=} and {self.output_len=} must be >= 0")

    @classmethod
    def from_messages(
        cls,
        *,
        send_s: float,
        messages: Iterable[tuple[float, int]],
        prompt_len: int,
        output_len: int,
        error: str | None = None,
    ) -> RequestRecord:
        """Builds a record from streamed messages of (receive time, number of tokens in it)."""
        times: list[float] = []
        for time_s, num_tokens in messages:
            if num_tokens < 0:
                raise ValueError(f"{num_tokens=} in the message at {time_s=} must be >= 0")
            times.extend([time_s] * num_tokens)
        return cls(send_s=send_s, token_times_s=tuple(times), prompt_len=prompt_len, output_len=output_len, error=error)

    @property
    def num_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ok(self) -> bool:
        return self.error is None and self.num_tokens > 0


def ttft_s(record: RequestRecord) -> float | None:
    """Time to first token; None for a failed request."""
    return record.token_times_s[0] - record.send_s if record.ok else None


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first; None when failed or with fewer than two tokens."""
    if not record.ok or record.num_tokens < 2:
        return None
    times = record.token_times_s
    return (times[-1] - times[0]) / (len(times) - 1)


def inter_token_latencies_s(record: RequestRecord) -> list[float]:
    """Gaps between consecutive tokens (empty when failed or with fewer than two tokens)."""
    if not record.ok:
        return []
    times = record.token_times_s
    return [b - a for a, b in zip(times, times[1:])]


def e2e_latency_s(record: RequestRecord) -> float | None:
    """Send to last token; None for a failed request."""
    return record.token_times_s[-1] - record.send_s if record.ok else None


def _check_slos(ttft_slo_s: float, tpot_slo_s: float) -> None:
    if not (ttft_slo_s > 0 and tpot_slo_s > 0):
        raise ValueError(f"{ttft_slo_s=} and {tpot_slo_s=} must both be > 0")


def meets_ttft(record: RequestRecord, ttft_slo_s: float) -> bool:
    ttft = ttft_s(record)
    return ttft is not None and ttft <= ttft_slo_s


def meets_tpot(record: RequestRecord, tpot_slo_s: float) -> bool:
    """True for a served request whose TPOT is within the SLO, or that has no TPOT (one token)."""
    if not record.ok:
        return False
    tpot = tpot_s(record)
    return tpot is None or tpot <= tpot_slo_s


@dataclasses.dataclass(frozen=True, kw_only=True)
class Attainment:
    """Shares of requests meeting the TTFT SLO, the TPOT SLO, and both (the paper's attainment)."""

    num_requests: int
    ttft: float
    tpot: float
    joint: float


def attainment(records: Sequence[RequestRecord], ttft_slo_s: float, tpot_slo_s: float) -> Attainment:
    _check_slos(ttft_slo_s, tpot_slo_s)
    if not records:
        raise ValueError("attainment of zero requests is undefined")
    ttft_ok = [meets_ttft(r, ttft_slo_s) for r in records]
    tpot_ok = [meets_tpot(r, tpot_slo_s) for r in records]
    n = len(records)
    return Attainment(
        num_requests=n,
        ttft=sum(ttft_ok) / n,
        tpot=sum(tpot_ok) / n,
        joint=sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / n,
    )


def percentiles(values: Sequence[float], qs: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """{"p50": ..., ...} with numpy's linear interpolation; NaN for every q when `values` is empty."""
    if any(not 0 <= q <= 100 for q in qs):
        raise ValueError(f"percentiles {qs=} must lie in [0, 100]")
    if len(values) == 0:
        return {f"p{q:g}": math.nan for q in qs}
    points = np.percentile(np.asarray(values, dtype=np.float64), list(qs))
    return {f"p{q:g}": float(v) for q, v in zip(qs, points)}


def latency_percentiles(
    records: Sequence[RequestRecord], qs: Sequence[float] = DEFAULT_PERCENTILES
) -> dict[str, dict[str, float]]:
    """Percentiles of TTFT, TPOT, E2E (per served request) and ITL (pooled over all gaps)."""
    served = [r for r in records if r.ok]
    tpots = [t for r in served if (t := tpot_s(r)) is not None]
    return {
        "ttft": percentiles([ttft_s(r) for r in served], qs),
        "tpot": percentiles(tpots, qs),
        "e2e": percentiles([e2e_latency_s(r) for r in served], qs),
        "itl": percentiles([gap for r in served for gap in inter_token_latencies_s(r)], qs),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Throughput:
    """Served work over the span from the first send to the last token received (NaN if no span)."""

    duration_s: float
    request_rate: float  # served requests / s
    output_token_rate: float  # output tokens received / s
    total_token_rate: float  # (prompt + output tokens) of served requests / s


def throughput(records: Sequence[RequestRecord]) -> Throughput:
    served = [r for r in records if r.ok]
    if not served:
        return Throughput(duration_s=math.nan, request_rate=0.0, output_token_rate=0.0, total_token_rate=0.0)
    duration = max(r.token_times_s[-1] for r in served) - min(r.send_s for r in records)
    if duration <= 0:
        return Throughput(
            duration_s=duration, request_rate=math.nan, output_token_rate=math.nan, total_token_rate=math.nan
        )
    output_tokens = sum(r.num_tokens for r in served)
    return Throughput(
        duration_s=duration,
        request_rate=len(served) / duration,
        output_token_rate=output_tokens / duration,
        total_token_rate=(output_tokens + sum(r.prompt_len for r in served)) / duration,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary:
    """Everything one benchmark run reports; `to_row()` flattens it for the results table."""

    num_requests: int
    num_failed: int
    ttft_slo_s: float
    tpot_slo_s: float
    attainment: Attainment
    latency: dict[str, dict[str, float]]
    throughput: Throughput

    def to_row(self, **labels: Any) -> dict[str, Any]:
        """`labels` (e.g. system="dsjax", rate=2.0) come first, then the metrics."""
        row: dict[str, Any] = dict(labels)
        row.update(
            num_requests=self.num_requests,
            num_failed=self.num_failed,
            ttft_slo_s=self.ttft_slo_s,
            tpot_slo_s=self.tpot_slo_s,
            attainment_ttft=self.attainment.ttft,
            attainment_tpot=self.attainment.tpot,
            attainment_joint=self.attainment.joint,
        )
        for metric, points in self.latency.items():
            for name, value in points.items():
                row[f"{metric}_{name}_s"] = value
        row.update(
            duration_s=self.throughput.duration_s,
            request_rate=self.throughput.request_rate,
            output_token_rate=self.throughput.output_token_rate,
            total_token_rate=self.throughput.total_token_rate,
        )
        return row


def summarize_run(records: Sequence[RequestRecord], ttft_slo_s: float, tpot_slo_s: float) -> RunSummary:
    return RunSummary(
        num_requests=len(records),
        num_failed=sum(not r.ok for r in records),
        ttft_slo_s=ttft_slo_s,
        tpot_slo_s=tpot_slo_s,
        attainment=attainment(records, ttft_slo_s, tpot_slo_s),
        latency=latency_percentiles(records),
        throughput=throughput(records),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GoodputResult:
    """`rate`: highest probed rate meeting the target (0.0 if none did). `probes`: (rate, attainment)
    in probe order. `saturated`: every scanned rate passed, so the true goodput may be higher."""

    rate: float
    probes: tuple[tuple[float, float], ...]
    saturated: bool


def goodput(
    measure_fn: Callable[[float], float],
    rates: Sequence[float],
    *,
    target: float = 0.9,
    rel_tol: float = 0.01,
    max_bisections: int = 12,
) -> GoodputResult:
    """Highest request rate whose joint SLO attainment `measure_fn(rate)` is >= `target`.

    Scans `rates` (increasing) until the first failing rate, then bisects between the last passing
    rate (or 0 when the first one fails) and that failing rate until the bracket is within
    `rel_tol` of the failing rate or `max_bisections` probes were spent. Assumes attainment does
    not increase with rate; a noisy measure can make the answer land on either side of a dip.
    """
    if not rates:
        raise ValueError("goodput needs at least one rate to scan")
    if any(r <= 0 for r in rates) or any(b <= a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"{rates=} must be positive and strictly increasing")
    if not 0 < target <= 1:
        raise ValueError(f"{target=} must lie in (0, 1]")
    if not rel_tol > 0 or max_bisections < 0:
        raise ValueError(f"{rel_tol=} must be > 0 and {max_bisections=} >= 0")
    probes: list[tuple[float, float]] = []

    def passes(rate: float) -> bool:
        value = float(measure_fn(rate))
        probes.append((rate, value))
        return value >= target

    lo, hi = 0.0, None
    for rate in rates:
        if not passes(rate):
            hi = rate
            break
        lo = rate
    if hi is None:
        return GoodputResult(rate=lo, probes=tuple(probes), saturated=True)
    for _ in range(max_bisections):
        if hi - lo <= rel_tol * hi:
            break
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(rate=lo, probes=tuple(probes), saturated=False)


def slo_scores(records: Sequence[RequestRecord], ttft_slo_s: float, tpot_slo_s: float) -> list[float]:
    """Per request, the smallest SLO scale it meets: max(TTFT/ttft_slo, TPOT/tpot_slo); inf if failed."""
    _check_slos(ttft_slo_s, tpot_slo_s)
    scores = []
    for r in records:
        ttft = ttft_s(r)
        if ttft is None:
            scores.append(math.inf)
            continue
        tpot = tpot_s(r)
        scores.append(max(ttft / ttft_slo_s, 0.0 if tpot is None else tpot / tpot_slo_s))
    return scores


def tightest_slo_scale(
    records: Sequence[RequestRecord], ttft_slo_s: float, tpot_slo_s: float, target: float = 0.9
) -> float:
    """Smallest s such that at least `target` of requests meet (s * ttft_slo, s * tpot_slo).

    Exact, no search: the ceil(target * n)-th smallest per-request score (see `slo_scores`).
    inf when too many requests failed for any scale to reach the target.
    """
    if not records:
        raise ValueError("tightest_slo_scale of zero requests is undefined")
    if not 0 < target <= 1:
        raise ValueError(f"{target=} must lie in (0, 1]")
    scores = sorted(slo_scores(records, ttft_slo_s, tpot_slo_s))
    # The 1e-9 keeps e.g. 0.9 * 10 = 9.000000000000002 from needing a 10th request.
    needed = max(1, math.ceil(target * len(scores) - 1e-9))
    return scores[needed - 1]


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def write_results_json(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """A JSON array of row objects; NaN and inf become null so any JSON reader accepts the file."""

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    with open(path, "w", encoding="utf-8") as f:
        json.dump([{k: clean(v) for k, v in row.items()} for row in rows], f, indent=2)
        f.write("\n")


def write_results_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """A CSV with the union of the rows' keys as header, in first-seen order; missing cells empty."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
