"""A request as the schedulers see it: tokens, sampling, status and its lifecycle record."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Sequence

from dsjax.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued for prefill (new, or preempted for recompute)
    PREFILLED = "prefilled"  # KV complete in the prefill pool, waiting to be pulled by decode
    MIGRATING = "migrating"
    RUNNING = "running"  # in a decode batch
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclasses.dataclass(kw_only=True)
class Lifecycle:
    """Wall-clock timestamps (time.perf_counter seconds) of one request's path through the engine."""

    arrival: float
    prefill_start: float | None = None
    prefill_end: float | None = None
    migration_start: float | None = None
    migration_end: float | None = None
    decode_start: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish: float | None = None
    num_preemptions: int = 0

    def breakdown(self) -> dict[str, float]:
        """Seconds spent queueing for prefill, in prefill, in transfer (incl. waiting to be
        pulled), and decoding; only the phases that happened are reported."""
        out: dict[str, float] = {}
        if self.prefill_start is not None:
            out["queue_s"] = self.prefill_start - self.arrival
        if self.prefill_start is not None and self.prefill_end is not None:
            out["prefill_s"] = self.prefill_end - self.prefill_start
        if self.prefill_end is not None and self.decode_start is not None:
            out["transfer_s"] = self.decode_start - self.prefill_end
        if self.decode_start is not None and self.finish is not None:
            out["decode_s"] = self.finish - self.decode_start
        return out

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


@dataclasses.dataclass(kw_only=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int
    # Every id that ends generation (Llama-3-Instruct lists several in generation_config.json).
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    lifecycle: Lifecycle = dataclasses.field(default_factory=lambda: Lifecycle(arrival=time.perf_counter()))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def peak_tokens(self) -> int:
        """KV tokens the request holds at its longest (prompt + max_tokens): what admission checks
        and what replica and decode-instance balancing reserve for it."""
        return self.prompt_len + self.sampling.max_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefill_token_ids(self) -> list[int]:
        """What a (re)prefill computes: the prompt and, after a preemption, the tokens generated so
        far; the token it samples is the next output token."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, now: float) -> bool:
        """Record a generated token; returns True (and sets finish_reason) when the request is done."""
        self.output_token_ids.append(int(token))
        self.lifecycle.token_times.append(now)
        sp = self.sampling
        if token in sp.stop_token_ids:
            self.finish_reason = FinishReason.STOP
        elif not sp.ignore_eos and token in self.eos_token_ids:
            self.finish_reason = FinishReason.EOS
        elif len(self.output_token_ids) >= sp.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        return self.finish_reason is not None


def validate_prompt(prompt_token_ids: Sequence[int], sampling: SamplingParams, *, vocab_size: int,
                    max_position: int) -> None:
    """The checks every entry point applies (offline API, gRPC, HTTP): ValueError names the field."""
    if len(prompt_token_ids) == 0:
        raise ValueError("prompt is empty: prompt_token_ids must hold at least one token")
    bad = [t for t in prompt_token_ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"prompt_token_ids hold ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")
    if len(prompt_token_ids) >= max_position:
        raise ValueError(f"prompt length {len(prompt_token_ids)} must be below the context length {max_position}")
    if len(prompt_token_ids) + sampling.max_tokens > max_position:
        raise ValueError(
            f"max_tokens={sampling.max_tokens} with a {len(prompt_token_ids)}-token prompt exceeds the context length {max_position}"
        )


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Positions [start, end) of `request` to prefill; `end == request.num_tokens` samples a token."""

    request: Request
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start
