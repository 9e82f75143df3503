"""The public endpoint: `dsjax.v1.Generation/Generate`, health checking, reflection, debug stats.

A request's path through the router:

    validate (serving/validation.py; ValueError -> INVALID_ARGUMENT naming the field)
    admit    (bounded: more than max_pending in flight -> RESOURCE_EXHAUSTED)
    start    on the backend (in-process engine, or prefill + decode workers)
    stream   token events -> GenerateResponse, detokenized incrementally; stop strings cut here
    finish   last message carries finish_reason and the latency breakdown

The server is asyncio (grpc.aio): an open stream is a coroutine on the router's loop, not a
thread. The client's cancellation or deadline cancels that coroutine, which cancels the backend
handle: the request is aborted on every instance that holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent import futures

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from models.config import ModelConfig
from serving.backend import Backend
from serving import stream_reader
from serving.cluster_auth import aio_server_interceptors, api_key_guard, cluster_guard
from serving.generation import GenerateError, Generation
from serving.messages import FINISH_TO_PROTO
from serving.prometheus import ServingMetrics
from serving.proto import GENERATION_SERVICE
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.validation import Limits

log = logging.getLogger(__name__)


class GenerationServicer(dsjax_pb2_grpc.GenerationServicer):
    """`Generate` over gRPC: the shared `Generation` path, its outputs as `GenerateResponse`s. An
    async generator on the router's event loop (serving/stream_reader.py): an open stream costs a
    coroutine, not a thread."""

    def __init__(self, generation: Generation):
        self.generation = generation

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802 (gRPC naming)
        try:
            stream = self.generation.start(request)
        except GenerateError as e:
            await context.abort(e.code, e.message)
        timing = pb.Timing(arrival_time=stream.arrival)
        # The client's cancel or deadline cancels this coroutine; leaving the reader then aborts the
        # request on every instance (stream.close()).
        async with contextlib.aclosing(stream_reader.outputs(stream)) as outputs:
            try:
                async for out in outputs:
                    timing.first_token_time, timing.time = out.first_token_time, out.time
                    msg = pb.GenerateResponse(request_id=stream.request_id, token_ids=out.token_ids, text=out.text,
                                              timing=timing)
                    if out.finish_reason is not None:
                        msg.finish_reason = FINISH_TO_PROTO[out.finish_reason]
                        if out.breakdown is not None:
                            msg.breakdown.CopyFrom(_breakdown_proto(out.breakdown))
                    yield msg
            except GenerateError as e:
                await context.abort(e.code, e.message)


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
    ready) and reflection; `extra_servicers` adds more (the worker registry in processes mode).
    With `credentials` the port is TLS (the public API's certificate); `admin=False` leaves Admin
    to the cluster's own listener (serving/channels.py InternalServer).

    It is a grpc.aio server on an event loop of its own thread: `Generate` streams are coroutines
    there; the plain servicers (Admin, the registry, health) run in its thread pool."""

    def __init__(self, backend: Backend, tokenizer, config: ModelConfig, *, port: int, host: str = "127.0.0.1",
                 limits: Limits = Limits(), max_pending: int = 256, metrics: ServingMetrics | None = None,
                 extra_servicers=(), api_key: str | None = None, cluster_token: str | None = None,
                 credentials: grpc.ServerCredentials | None = None, admin: bool = True):
        self.backend = backend
        self.metrics = metrics or ServingMetrics(backend.instances)
        self.generation = Generation(backend, tokenizer, config, limits=limits, max_pending=max_pending, metrics=self.metrics)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="router-loop", daemon=True)
        self._loop_thread.start()
        try:
            self.port = self._on_loop(self._build(
                host, port, credentials, max_message=max(64 << 20, 4 * limits.max_request_bytes),
                interceptors=aio_server_interceptors(api_key_guard(api_key) if api_key else None,
                                                     cluster_guard(cluster_token) if cluster_token else None),
                extra_servicers=extra_servicers, admin=admin))
        except BaseException:
            self._close_loop()
            raise
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_health, name="router-health", daemon=True)

    async def _build(self, host, port, credentials, *, max_message, interceptors, extra_servicers, admin) -> int:
        self.server = grpc.aio.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="router"),
            # Generate needs the API key (when set); Registry and Admin the cluster token (when set).
            interceptors=interceptors,
            # Workers ping the router (registry heartbeats over kept-alive channels): without these
            # permits the server answers GOAWAY "too_many_pings" and healthy workers get dropped.
            options=[("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                     ("grpc.http2.max_ping_strikes", 0), ("grpc.so_reuseport", 0)],
        )
        dsjax_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.generation), self.server)
        if admin:
            worker_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.backend), self.server)
        for add, servicer in extra_servicers:
            add(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        admin_name = [wpb.DESCRIPTOR.services_by_name["Admin"].full_name] if admin else []
        reflection.enable_server_reflection([GENERATION_SERVICE, *admin_name, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        address = f"{host}:{port}"
        try:
            bound = self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise RuntimeError(f"could not bind the router to {host}:{port}")
        return bound

    def _on_loop(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5.0)

    def start(self) -> "RouterServer":
        self._set_health(bool(self.backend.ready()))
        self._on_loop(self.server.start())
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
        self._on_loop(self.server.wait_for_termination())

    def stop(self, grace: float = 2.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.health.enter_graceful_shutdown()
        try:
            self._on_loop(self.server.stop(grace), timeout=grace + 10.0)
        finally:
            self._close_loop()
