"""The public endpoint: `dsjax.v1.Generation/Generate`, health checking, reflection, debug stats.

A request's path through the router:

    validate (serving/validation.py; ValueError -> INVALID_ARGUMENT naming the field)
    admit    (bounded: more than max_pending in flight -> RESOURCE_EXHAUSTED)
    start    on the backend (in-process engine, or prefill + decode workers)
    stream   token events -> GenerateResponse, detokenized incrementally; stop strings cut here
    finish   last message carries finish_reason and the latency breakdown

The client's cancellation or deadline fires the RPC's termination callback, which cancels the
backend handle: the request is aborted on every instance that holds it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from models.config import ModelConfig
from serving.backend import Backend, GenerateJob
from serving.engine_loop import ErrorEvent, FinishEvent, TokenEvent
from serving.messages import FINISH_TO_PROTO
from serving.prometheus import ServingMetrics
from serving.proto import GENERATION_SERVICE
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.text_stream import TextStream
from serving.validation import Limits, validate_request

log = logging.getLogger(__name__)


class GenerationServicer(dsjax_pb2_grpc.GenerationServicer):
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

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):  # noqa: N802 (gRPC naming)
        arrival = time.time()
        try:
            prompt, sampling = validate_request(request, self.tokenizer, self.config, self.limits)
        except ValueError as e:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        with self._lock:
            if len(self._active) >= self.max_pending:
                self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"admission queue full: {len(self._active)} requests in flight (max_pending={self.max_pending})")
            if rid in self._active:
                self._abort(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id={rid!r} is already in flight")
            self._active.add(rid)
            self.metrics.active.set(len(self._active))
        try:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
            job = GenerateJob(request_id=rid, prompt_token_ids=prompt, sampling=sampling, seed=seed,
                              eos_token_id=self.config.eos_token_id)
            handle = self.backend.submit(job)
            context.add_callback(handle.cancel)  # client cancel or deadline: abort everywhere
            yield from self._stream(rid, prompt, sampling.stop, handle, arrival, context)
        finally:
            with self._lock:
                self._active.discard(rid)
                self.metrics.active.set(len(self._active))

    def _stream(self, rid, prompt, stop, handle, arrival, context):
        text = TextStream(self.tokenizer, prompt, stop)
        token_times: list[float] = []
        timing = pb.Timing(arrival_time=arrival)
        for event in handle.events():
            now = time.time()
            if isinstance(event, TokenEvent):
                if not event.token_ids:
                    continue
                token_times += [now] * len(event.token_ids)
                timing.first_token_time = timing.first_token_time or now
                delta, stopped = text.add(event.token_ids)
                timing.time = now
                msg = pb.GenerateResponse(request_id=rid, token_ids=event.token_ids, text=delta, timing=timing)
                if stopped:  # a stop string: finish here and abort the rest of the generation
                    handle.cancel()
                    msg.finish_reason = pb.STOP
                    self.metrics.observe_finished("stop", arrival, token_times, {})
                    yield msg
                    return
                yield msg
            elif isinstance(event, FinishEvent):
                timing.time = now
                bd = event.breakdown or {}
                reason = FINISH_TO_PROTO.get(event.reason, pb.CANCELLED)
                self.metrics.observe_finished(pb.FinishReason.Name(reason).lower(), arrival, token_times, bd)
                yield pb.GenerateResponse(request_id=rid, text=text.finish(), finish_reason=reason, timing=timing,
                                          breakdown=_breakdown_proto(bd))
                return
            elif isinstance(event, ErrorEvent):
                self._abort(context, event.code, event.message)
        self._abort(context, grpc.StatusCode.INTERNAL, "the backend ended the stream without a finish")

    def _abort(self, context, code: grpc.StatusCode, message: str):
        self.metrics.errors.labels(code.name).inc()
        context.abort(code, message)


def _breakdown_proto(bd: dict) -> pb.LatencyBreakdown:
    return pb.LatencyBreakdown(
        queue_seconds=bd.get("queue_s", 0.0), prefill_seconds=bd.get("prefill_s", 0.0), transfer_seconds=bd.get("transfer_s", 0.0),
        decode_seconds=bd.get("decode_s", 0.0), kv_bytes=int(bd.get("kv_bytes", 0)), num_recomputes=int(bd.get("recomputes", 0)),
    )


class AdminServicer(worker_pb2_grpc.AdminServicer):
    def __init__(self, backend: Backend):
        self.backend = backend

    def Instances(self, request, context):  # noqa: N802
        return wpb.InstancesResponse(instances=self.backend.instances())


class RouterServer:
    """The router's gRPC server: Generation, Admin, health (NOT_SERVING until the backend is
    ready) and reflection; `extra_servicers` adds more (the worker registry in processes mode)."""

    def __init__(self, backend: Backend, tokenizer, config: ModelConfig, *, port: int, host: str = "[::]",
                 limits: Limits = Limits(), max_pending: int = 256, metrics: ServingMetrics | None = None,
                 extra_servicers=()):
        self.backend = backend
        self.metrics = metrics or ServingMetrics(backend.instances)
        self.generation = GenerationServicer(backend, tokenizer, config, limits=limits, max_pending=max_pending, metrics=self.metrics)
        max_message = max(64 << 20, 4 * limits.max_request_bytes)  # over it gRPC itself answers RESOURCE_EXHAUSTED
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_pending + 32, thread_name_prefix="router"),
            # Workers ping the router (registry heartbeats over kept-alive channels): without these
            # permits the server answers GOAWAY "too_many_pings" and healthy workers get dropped.
            options=[("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                     ("grpc.http2.max_ping_strikes", 0), ("grpc.so_reuseport", 0)],
        )
        dsjax_pb2_grpc.add_GenerationServicer_to_server(self.generation, self.server)
        worker_pb2_grpc.add_AdminServicer_to_server(AdminServicer(backend), self.server)
        for add, servicer in extra_servicers:
            add(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [GENERATION_SERVICE, wpb.DESCRIPTOR.services_by_name["Admin"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind the router to {host}:{port}")
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_health, name="router-health", daemon=True)

    def start(self) -> "RouterServer":
        self._set_health(bool(self.backend.ready()))
        self.server.start()
        self._watch.start()
        return self

    def _set_health(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", GENERATION_SERVICE):
            self.health.set(name, status)

    def _watch_health(self) -> None:
        last = bool(self.backend.ready())
        while not self._stop.wait(0.2):
            ok = bool(self.backend.ready())
            if ok != last:
                log.info("router health: %s", "SERVING" if ok else "NOT_SERVING")
                self._set_health(ok)
                last = ok

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
