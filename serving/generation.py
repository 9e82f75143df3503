"""One request's way through the router, whatever front it came in by (gRPC `Generate` or the
OpenAI HTTP API): the same checks, the same admission, the same backend, the same stream.

    stream = generation.start(request)      # validate, admit, submit: GenerateError on refusal
    for out in stream:                      # Output: new token ids + text delta; the last one has
        ...                                 #   finish_reason and the latency breakdown
    stream.cancel()                         # client gone or deadline: abort on every instance

Errors carry a gRPC status code (the HTTP front maps it to a status: INVALID_ARGUMENT -> 400,
RESOURCE_EXHAUSTED -> 429, UNAVAILABLE -> 503). The admission slot is held from `start` until the
stream is exhausted or closed, so `max_pending` bounds the requests in flight over both fronts.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
import uuid
from typing import Iterator

import grpc

from dsjax.engine.request import FinishReason
from dsjax.engine.sampling_params import SamplingParams
from models.config import ModelConfig
from serving.backend import Backend, GenerateJob, Handle
from serving.engine_loop import ErrorEvent, FinishEvent, TokenEvent
from serving.messages import FINISH_TO_PROTO
from serving.prometheus import ServingMetrics
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.text_stream import TextStream
from serving.validation import Limits, validate_request


class GenerateError(Exception):
    """A request refused or ended by the server: a status code and a message naming the cause."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class Output:
    """New tokens of one stream (possibly none in the last piece) and their text."""

    token_ids: list[int]
    text: str
    time: float  # wall clock when the router handed it on
    first_token_time: float  # 0.0 until the first token
    finish_reason: FinishReason | None = None  # set on the last piece only
    breakdown: dict | None = None  # the last piece: queue/prefill/transfer/decode seconds, kv_bytes


class Generation:
    def __init__(self, backend: Backend, tokenizer, config: ModelConfig, *, limits: Limits = Limits(),
                 max_pending: int = 256, metrics: ServingMetrics | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config
        self.limits = limits
        self.max_pending = max_pending
        self.metrics = metrics or ServingMetrics()
        self._lock = threading.Lock()
        self._active: set[str] = set()

    def start(self, request: pb.GenerateRequest) -> GenerateStream:
        arrival = time.time()
        try:
            prompt, sampling = validate_request(request, self.tokenizer, self.config, self.limits)
        except ValueError as e:
            raise self.error(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        with self._lock:
            if len(self._active) >= self.max_pending:
                raise self.error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"admission queue full: {len(self._active)} requests in flight (max_pending={self.max_pending})")
            if rid in self._active:
                raise self.error(grpc.StatusCode.ALREADY_EXISTS, f"request_id={rid!r} is already in flight")
            self._active.add(rid)
            self.metrics.active.set(len(self._active))
        try:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
            job = GenerateJob(request_id=rid, prompt_token_ids=prompt, sampling=sampling, seed=seed,
                              eos_token_ids=self.config.all_eos_token_ids)
            handle = self.backend.submit(job)
        except BaseException:
            self._release(rid)
            raise
        return GenerateStream(self, rid, prompt, sampling, handle, arrival)

    def error(self, code: grpc.StatusCode, message: str) -> GenerateError:
        self.metrics.errors.labels(code.name).inc()
        return GenerateError(code, message)

    def _release(self, rid: str) -> None:
        with self._lock:
            self._active.discard(rid)
            self.metrics.active.set(len(self._active))


class GenerateStream:
    """The outputs of one admitted request; read it once, either by iterating (blocking: on a
    worker thread) or by feeding it the events of `handle.outbox` (`on_event`, then `close`)."""

    def __init__(self, generation: Generation, request_id: str, prompt: list[int], sampling: SamplingParams,
                 handle: Handle, arrival: float):
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.sampling = sampling
        self.arrival = arrival
        self.handle = handle
        self.finished = False
        self._generation = generation
        self._text = TextStream(generation.tokenizer, prompt, sampling.stop)
        self._token_times: list[float] = []
        self._first = 0.0
        self._closed = False

    def cancel(self) -> None:
        """Abort the request on every instance that holds it (idempotent, any thread)."""
        self.handle.cancel()

    def close(self) -> None:
        """Done reading: cancel what still runs (a no-op once finished; frees the KV of an
        abandoned stream) and give the admission slot back. Idempotent."""
        if not self._closed:
            self._closed = True
            self.handle.cancel()
            self._generation._release(self.request_id)

    def __iter__(self) -> Iterator[Output]:
        try:
            for event in self.handle.events():
                out = self.on_event(event)
                if out is not None:
                    yield out
                if self.finished:
                    return
            raise self._generation.error(grpc.StatusCode.INTERNAL, "the backend ended the stream without a finish")
        finally:
            self.close()

    def on_event(self, event) -> Output | None:
        """The output of one backend event (None for an empty one); raises the GenerateError an
        ErrorEvent carries. After the output with a finish reason, `finished` is set."""
        metrics = self._generation.metrics
        now = time.time()
        if isinstance(event, TokenEvent):
            if not event.token_ids:
                return None
            self._token_times += [now] * len(event.token_ids)
            self._first = self._first or now
            delta, stopped = self._text.add(event.token_ids)
            if stopped:  # a stop string: finish here and abort the rest of the generation
                self.handle.cancel()
                metrics.observe_finished("stop", self.arrival, self._token_times, {})
                self.finished = True
                return Output(list(event.token_ids), delta, now, self._first, FinishReason.STOP)
            return Output(list(event.token_ids), delta, now, self._first)
        if isinstance(event, FinishEvent):
            bd = event.breakdown or {}
            reason = event.reason if event.reason in FINISH_TO_PROTO else FinishReason.CANCELLED
            metrics.observe_finished(reason.value, self.arrival, self._token_times, bd)
            self.finished = True
            return Output([], self._text.finish(), now, self._first, reason, bd)
        if isinstance(event, ErrorEvent):
            self.finished = True
            raise self._generation.error(event.code, event.message)
        raise TypeError(f"unknown backend event {event!r}")
