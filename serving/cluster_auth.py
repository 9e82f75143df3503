"""The cluster's credential: a shared secret every internal call carries.

Internal services (the router's Registry and Admin, the workers' PrefillWorker / DecodeWorker /
Worker: registration, heartbeats, prefill and decode calls, KV pulls, lease renewals and releases,
stats) answer only a caller that presents the cluster token in metadata `x-dsjax-cluster-token`;
without it, or with a wrong one, every such call ends UNAUTHENTICATED before any handler runs. The
public API (Generation, health, reflection) is not covered: `--api-key` guards that.

The token comes from $DSJAX_CLUSTER_TOKEN. `python -m dsjax.serve` makes a random one when it
starts the workers itself (they inherit it); processes started by hand (`--role ...`) must all be
given the same one, and refuse to start without it. The token travels in the clear unless the
cluster runs with `--tls-dir` (mutual TLS on every internal channel: serving/tls.py), which
untrusted networks need.
"""

from __future__ import annotations

import hmac
import inspect
import os
import secrets
from typing import Callable

import grpc
import grpc.aio

from serving.proto import GENERATION_SERVICE

TOKEN_ENV = "DSJAX_CLUSTER_TOKEN"
METADATA_KEY = "x-dsjax-cluster-token"
# Services anyone may call; every other service on a dsjax server is internal.
PUBLIC_SERVICES = (GENERATION_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                   "grpc.reflection.v1.ServerReflection")


def cluster_token(*, create: bool = False) -> str:
    """$DSJAX_CLUSTER_TOKEN; with `create`, a fresh random one is made (and exported, so child
    processes inherit it) when none is set. A ValueError explains what to do otherwise."""
    token = os.environ.get(TOKEN_ENV, "")
    if not token and create:
        token = os.environ[TOKEN_ENV] = secrets.token_urlsafe(32)
    if not token:
        raise ValueError(f"set {TOKEN_ENV} to one secret shared by the router and every worker of this cluster "
                         f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def _deny_like(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""

    behavior = next(b for b in (handler.unary_unary, handler.unary_stream, handler.stream_unary, handler.stream_stream)
                    if b is not None)
    if inspect.isasyncgenfunction(behavior):  # on an aio server the refusal keeps the handler's kind
        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # never reached: makes this an async generator
    elif inspect.iscoroutinefunction(behavior):
        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    else:
        def deny(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class MetadataGuard(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED and `refusal`, every call to a service `guards(service)`
    selects that does not carry metadata `key` equal to `secret` (compared in constant time)."""

    def __init__(self, *, key: str, secret: str, guards: Callable[[str], bool], refusal: str):
        if not secret:
            raise ValueError(f"the secret for metadata {key!r} must be non-empty")
        self._key, self._secret, self._guards, self._refusal = key, secret.encode(), guards, refusal

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if handler is None or not self._guards(service):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get(self._key, "")
        if hmac.compare_digest(given.encode(), self._secret):
            return handler
        return _deny_like(handler, f"{handler_call_details.method}: {self._refusal}")


class ParseGuard(grpc.ServerInterceptor):
    """Parses each unary request inside its handler, so that bytes which are not a valid message of
    the method's type (a string field that is not UTF-8, a truncated or garbage message) end
    INVALID_ARGUMENT naming the method and the type, not gRPC's own INTERNAL "Exception
    deserializing request!" (and an error logged with its traceback) for a client's mistake. Put it
    after the MetadataGuards: a caller without the credential still gets UNAUTHENTICATED."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

        def request_of(raw: bytes):  # (request, None) or (None, the refusal's message)
            try:
                return parse(raw), None
            except Exception as e:  # protobuf's DecodeError names the message type
                return None, f"{method}: the request is not a valid message of its type (strings must be UTF-8): {e}"

        # The wrapper keeps the behaviour's kind: an aio server runs async generators and coroutines
        # on its loop, plain functions in its thread pool.
        if inspect.isasyncgenfunction(behavior):
            async def parsed(raw: bytes, context):
                request, refusal = request_of(raw)
                if refusal is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
                async for response in behavior(request, context):
                    yield response
        elif inspect.iscoroutinefunction(behavior):
            async def parsed(raw: bytes, context):
                request, refusal = request_of(raw)
                if refusal is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
                return await behavior(request, context)
        else:
            def parsed(raw: bytes, context):
                request, refusal = request_of(raw)
                if refusal is not None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
                return behavior(request, context)

        make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        return make(parsed, request_deserializer=None, response_serializer=handler.response_serializer)


class AioInterceptor(grpc.aio.ServerInterceptor):
    """One of the interceptors above on an asyncio server (the router's public server): they only
    look at the call's details and the handler, so the sync logic serves both kinds of server."""

    def __init__(self, inner: grpc.ServerInterceptor):
        self._inner = inner

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return self._inner.intercept_service(lambda _details: handler, handler_call_details)


def server_interceptors(*guards: MetadataGuard | None) -> list[grpc.ServerInterceptor]:
    """A dsjax server's interceptors: the credential checks given (None: not set), then `ParseGuard`."""
    return [*(g for g in guards if g is not None), ParseGuard()]


def aio_server_interceptors(*guards: MetadataGuard | None) -> list[grpc.aio.ServerInterceptor]:
    """`server_interceptors` for an asyncio server."""
    return [AioInterceptor(i) for i in server_interceptors(*guards)]


def cluster_guard(token: str) -> MetadataGuard:
    """Internal services answer only calls carrying the cluster token."""
    return MetadataGuard(key=METADATA_KEY, secret=token, guards=lambda service: service not in PUBLIC_SERVICES,
                         refusal=f"internal to the cluster: missing or wrong cluster token ({TOKEN_ENV})")


def api_key_guard(api_key: str) -> MetadataGuard:
    """The public `Generate` answers only calls carrying `authorization: Bearer KEY` (`--api-key`)."""
    return MetadataGuard(key="authorization", secret=f"Bearer {api_key}", guards=lambda service: service == GENERATION_SERVICE,
                         refusal="missing or wrong API key (metadata authorization: Bearer KEY)")


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._pair = (METADATA_KEY, token)

    def _details(self, d):
        return d._replace(metadata=list(d.metadata or ()) + [self._pair])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """`channel` whose every call carries the cluster token (unchanged when there is none)."""
    return grpc.intercept_channel(channel, _TokenMetadata(token)) if token else channel
