"""The records a benchmark run deals in: what it sends (`BenchRequest`), what it saw of each request
(`RequestResult`, with the server's `Breakdown`), and a whole run at one rate (`LoadRun`).
Plain data: the load generator fills them, the analysis, sweeps, plots and the simulator
comparison read them."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from dsjax.bench.metrics import RequestRecord

if TYPE_CHECKING:
    from serving.proto.dsjax.v1 import dsjax_pb2 as pb


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchRequest:
    """One request to send. Exactly one of `prompt_token_ids` and `prompt_text` is set."""

    index: int  # position in the trace
    prompt_len: int  # tokens the server will prefill (nominal for text prompts)
    output_len: int  # max_tokens, with EOS ignored
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt_token_ids is None) == (self.prompt_text is None):
            raise ValueError(f"request {self.index}: set exactly one of prompt_token_ids and prompt_text")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_len:
            raise ValueError(f"request {self.index}: {self.prompt_len=} != {len(self.prompt_token_ids)=}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"request {self.index}: {self.prompt_len=} and {self.output_len=} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Breakdown:
    """The server's `LatencyBreakdown` of one request (router-measured seconds)."""

    queue_s: float
    prefill_s: float
    transfer_s: float
    decode_s: float
    kv_bytes: int
    num_recomputes: int

    @classmethod
    def from_proto(cls, msg: pb.LatencyBreakdown) -> Breakdown:
        return cls(queue_s=msg.queue_seconds, prefill_s=msg.prefill_seconds, transfer_s=msg.transfer_seconds,
                   decode_s=msg.decode_seconds, kv_bytes=msg.kv_bytes, num_recomputes=msg.num_recomputes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestResult:
    index: int
    request_id: str
    scheduled_s: float  # when the schedule said to send it
    record: RequestRecord  # client-side times, relative to the run's start
    breakdown: Breakdown | None
    server_ttft_s: float | None  # router-side first_token_time - arrival_time
    finish_reason: str
    # When the router received it, on the run's clock: the router's wall-clock arrival_time minus
    # the run's wall-clock start (`LoadRun.started_at`). Comparable with send_s only where client
    # and router read one clock (one host, as in the emulated compare); None where not reported.
    server_arrival_s: float | None = None

    def to_json(self) -> dict:
        r = self.record
        return {
            "index": self.index, "request_id": self.request_id, "scheduled_s": self.scheduled_s, "send_s": r.send_s,
            "prompt_len": r.prompt_len, "output_len": r.output_len, "error": r.error, "finish_reason": self.finish_reason,
            "token_times_s": list(r.token_times_s), "server_ttft_s": self.server_ttft_s,
            "server_arrival_s": self.server_arrival_s,
            "breakdown": None if self.breakdown is None else dataclasses.asdict(self.breakdown),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadRun:
    """Everything one run at one rate saw, in trace order."""

    rate: float
    results: tuple[RequestResult, ...]
    wall_s: float
    stopped_early: bool
    send_lag_p99_s: float  # how late requests were sent against the schedule (client health)
    send_lag_max_s: float
    started_at: float = math.nan  # wall clock (time.time()) when the schedule's time 0 was
    # Requests before this index (those scheduled in the run's settling time, while the queues of
    # an empty server fill) are load, not measured: attainment counts results[measured_from:].
    measured_from: int = 0
    # What the server counted over the run (sweep_target's `counters`: e.g. an emulated cluster's
    # host time per decode step), after minus before; None when not asked.
    server_counters: dict[str, float] | None = None

    def time_scaled(self, factor: float) -> LoadRun:
        """This run with every duration x `factor` (schedule, send and token times, the server's
        breakdown and TTFT, the run's wall time and send lag, counters in seconds); counts, the
        rate and the wall-clock start unchanged. A run against a cluster in slow motion x K
        (`sweep.SweepConfig.time_scale`) read at 1/K is the run of that cluster at full speed."""
        if factor == 1:
            return self

        def result(r: RequestResult) -> RequestResult:
            rec = dataclasses.replace(r.record, send_s=r.record.send_s * factor,
                                      token_times_s=tuple(t * factor for t in r.record.token_times_s))
            bd = r.breakdown and dataclasses.replace(r.breakdown, queue_s=r.breakdown.queue_s * factor,
                                                     prefill_s=r.breakdown.prefill_s * factor,
                                                     transfer_s=r.breakdown.transfer_s * factor,
                                                     decode_s=r.breakdown.decode_s * factor)
            ttft = None if r.server_ttft_s is None else r.server_ttft_s * factor
            arrived = None if r.server_arrival_s is None else r.server_arrival_s * factor
            return dataclasses.replace(r, scheduled_s=r.scheduled_s * factor, record=rec, breakdown=bd, server_ttft_s=ttft,
                                       server_arrival_s=arrived)

        counters = None if self.server_counters is None else {
            k: v * factor if k.endswith("seconds") else v for k, v in self.server_counters.items()}
        return dataclasses.replace(self, results=tuple(result(r) for r in self.results), wall_s=self.wall_s * factor,
                                   send_lag_p99_s=self.send_lag_p99_s * factor, send_lag_max_s=self.send_lag_max_s * factor,
                                   server_counters=counters)

    @property
    def measured(self) -> tuple[RequestResult, ...]:
        return self.results[self.measured_from:]

    @property
    def records(self) -> list[RequestRecord]:
        """The measured requests' records (every attainment and latency figure is of these)."""
        return [r.record for r in self.measured]
