"""From load runs to the reported numbers: result rows, SLO-scale curves, latency breakdowns, and
goodput by scan + bisection. Metric definitions live in `dsjax.bench.metrics` (reused here).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsjax.bench.metrics import (
    GoodputResult,
    RequestRecord,
    attainment,
    e2e_latency_s,
    goodput,
    summarize_run,
    tightest_slo_scale,
)
from dsjax.bench.records import Breakdown, LoadRun, RequestResult

BREAKDOWN_PARTS = ("queue_s", "prefill_s", "transfer_s", "decode_s")
DEFAULT_SLO_SCALES = tuple(float(s) for s in np.round(np.geomspace(0.25, 8.0, 21), 4))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SLOs:
    ttft_s: float
    tpot_s: float
    target: float = 0.9

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLOs must be > 0, got ttft_s={self.ttft_s}, tpot_s={self.tpot_s}")
        if not 0 < self.target <= 1:
            raise ValueError(f"target={self.target} must lie in (0, 1]")


def _decode_s(r: RequestResult) -> float:
    """The server's decode seconds; when it reports none (0) for a multi-token request, the
    client's first-to-last-token time minus the KV transfer stands in."""
    bd = r.breakdown
    if bd.decode_s > 0 or r.record.num_tokens < 2:  # type: ignore[union-attr]
        return bd.decode_s  # type: ignore[union-attr]
    times = r.record.token_times_s
    return max(0.0, times[-1] - times[0] - bd.transfer_s)  # type: ignore[union-attr]


def mean_breakdown(run: LoadRun) -> dict[str, float]:
    """Mean seconds per served request in each server phase (queue, prefill, KV transfer, decode;
    see `_decode_s`), plus `other_s` = client E2E minus those parts (network, router, client
    loop). Empty when the server sent no breakdown."""
    served = [r for r in run.results if r.record.ok and r.breakdown is not None]
    if not served:
        return {}
    out = {part: float(np.mean([getattr(r.breakdown, part) for r in served])) for part in BREAKDOWN_PARTS[:3]}
    out["decode_s"] = float(np.mean([_decode_s(r) for r in served]))
    e2e = float(np.mean([e2e_latency_s(r.record) for r in served]))
    out["other_s"] = max(0.0, e2e - sum(out.values()))
    out["kv_bytes"] = float(np.mean([r.breakdown.kv_bytes for r in served]))  # type: ignore[union-attr]
    out["num_recomputes"] = float(sum(r.breakdown.num_recomputes for r in served))  # type: ignore[union-attr]
    return out


def run_row(run: LoadRun, slos: SLOs, **labels: Any) -> dict[str, Any]:
    """One flat results row: labels, `summarize_run` metrics, the tightest SLO scale holding the
    target, the mean server breakdown and client health (send lag)."""
    records = run.records
    row = summarize_run(records, slos.ttft_s, slos.tpot_s).to_row(**labels, rate=run.rate)
    row["tightest_slo_scale"] = tightest_slo_scale(records, slos.ttft_s, slos.tpot_s, slos.target)
    server_ttfts = [r.server_ttft_s for r in run.results if r.server_ttft_s is not None]
    row["server_ttft_mean_s"] = float(np.mean(server_ttfts)) if server_ttfts else math.nan
    for key, value in mean_breakdown(run).items():
        row[f"mean_{key}"] = value
    row.update(stopped_early=run.stopped_early, wall_s=run.wall_s, started_at=run.started_at, send_lag_p99_s=run.send_lag_p99_s,
               send_lag_max_s=run.send_lag_max_s)
    errors = [r.record.error for r in run.results if r.record.error]
    row["first_error"] = errors[0] if errors else ""
    return row


def slo_scale_curve(
    records: Sequence[RequestRecord], slos: SLOs, scales: Sequence[float] = DEFAULT_SLO_SCALES
) -> list[tuple[float, float]]:
    """(scale, joint attainment at scale * both SLOs) for each scale."""
    return [(float(s), attainment(records, s * slos.ttft_s, s * slos.tpot_s).joint) for s in scales]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GoodputSearch:
    """A goodput search's verdict and every run it made, in probe order."""

    result: GoodputResult
    runs: tuple[LoadRun, ...]

    @property
    def rate(self) -> float:
        return self.result.rate


def search_goodput(
    run_at: Callable[[float, bool], LoadRun],
    rates: Sequence[float],
    slos: SLOs,
    *,
    rel_tol: float = 0.05,
    max_bisections: int = 6,
    on_run: Callable[[LoadRun], None] | None = None,
) -> GoodputSearch:
    """Goodput (`metrics.goodput`): scan `rates` upward, then bisect the first failing bracket.

    `run_at(rate, early_stop)` runs the load at a rate; scan rates run in full (their attainment is
    reported and plotted), bisection probes may stop early (only their pass/fail matters). A rate
    probed twice is run once.
    """
    scan = {float(r) for r in rates}
    runs: dict[float, LoadRun] = {}

    def measure(rate: float) -> float:
        if rate not in runs:
            run = run_at(rate, rate not in scan)
            runs[rate] = run
            if on_run is not None:
                on_run(run)
        return attainment(runs[rate].records, slos.ttft_s, slos.tpot_s).joint

    result = goodput(measure, list(rates), target=slos.target, rel_tol=rel_tol, max_bisections=max_bisections)
    return GoodputSearch(result=result, runs=tuple(runs.values()))


def clean_json(value: Any) -> Any:
    """NaN and inf become null, recursively, so any JSON reader accepts the document."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def write_json(path: str | Path, doc: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean_json(doc), f, indent=2)
        f.write("\n")


def read_run(path: str | Path, row: Mapping[str, Any]) -> LoadRun:
    """A `LoadRun` back from `write_requests_jsonl`'s file and the run's results row."""
    results = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            record = RequestRecord(send_s=d["send_s"], token_times_s=tuple(d["token_times_s"]), prompt_len=d["prompt_len"],
                                   output_len=d["output_len"], error=d["error"])
            bd = d.get("breakdown")
            results.append(RequestResult(index=d["index"], request_id=d["request_id"], scheduled_s=d["scheduled_s"],
                                         record=record, breakdown=None if bd is None else Breakdown(**bd),
                                         server_ttft_s=d["server_ttft_s"], finish_reason=d["finish_reason"],
                                         server_arrival_s=d.get("server_arrival_s")))
    nan = math.nan
    return LoadRun(rate=float(row["rate"]), results=tuple(results), wall_s=row.get("wall_s") or nan,
                   stopped_early=bool(row.get("stopped_early")), send_lag_p99_s=row.get("send_lag_p99_s") or nan,
                   send_lag_max_s=row.get("send_lag_max_s") or nan, started_at=row.get("started_at") or nan)


def write_requests_jsonl(path: str | Path, run: LoadRun, **labels: Any) -> None:
    """Every request of a run, one JSON object a line (labels first), for later analysis."""
    with open(path, "w", encoding="utf-8") as f:
        for r in run.results:
            f.write(json.dumps(clean_json({**labels, "rate": run.rate, **r.to_json()})) + "\n")
