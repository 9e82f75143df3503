"""The OpenAI-compatible HTTP front, in the router's process, beside the gRPC service:

    POST /v1/completions, /v1/chat/completions   plain JSON, or server-sent events with `stream`
    GET  /v1/models                                 the one served model
    GET  /health                                    200 once the backend is warm, 503 before
    GET  /metrics                                   the router's Prometheus registry

Every request goes through the router's `Generation` (serving/generation.py): the same checks,
admission queue and backend as gRPC `Generate`. Its statuses map to HTTP: INVALID_ARGUMENT 400,
RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, others 500, with OpenAI's error body; an unknown model is
404, a missing or wrong `--api-key` 401.

Threads: uvicorn serves the app from one thread; streams are read on its event loop
(serving/stream_reader.py: a request's outbox wakes the loop directly, whichever backend
fills it). When a streaming client disconnects, the response is closed (or its
watcher notices) and cancels the request on the backend, which frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
from typing import AsyncIterator, Callable

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import openai_protocol as oai
from serving import stream_reader
from serving.generation import GenerateError, Generation, GenerateStream, Output

log = logging.getLogger(__name__)

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.ALREADY_EXISTS: 409,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503}
_NAMED_FIELD = re.compile(r"^(\w+)=")
DISCONNECT_POLL_S = 0.5  # while no token comes, how often a waiting response checks for its client


def _error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    if param is None and (named := _NAMED_FIELD.match(message)):  # "top_p=1.5 must be in (0, 1]" names top_p
        param = named.group(1)
    return JSONResponse(oai.error_body(message, kind=kind, param=param, code=code), status_code=status)


def _from_generate_error(e: GenerateError) -> JSONResponse:
    status = HTTP_STATUS.get(e.code, 500)
    kind = {400: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
    return _error(status, e.message, kind=kind, code=e.code.name.lower())


async def _outputs(stream: GenerateStream, request: Request) -> AsyncIterator[Output]:
    """The stream's outputs on the event loop (serving/stream_reader.py); raises its GenerateError.
    Leaving early (closed by the caller, or the client found gone) cancels the request everywhere."""
    gone = asyncio.Event()
    watcher = asyncio.create_task(_cancel_when_gone(request, stream, gone))
    try:
        async with contextlib.aclosing(stream_reader.outputs(stream, gone)) as outs:
            async for out in outs:
                yield out
    finally:
        watcher.cancel()


async def _cancel_when_gone(request: Request, stream: GenerateStream, wake: asyncio.Event) -> None:
    """A response only learns that its client left when a send fails; while no token comes (a
    queued request) this checks every DISCONNECT_POLL_S and ends the stream early instead."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    stream.cancel()
    wake.set()


def _sse(doc: dict) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


class OpenAIApp:
    """The FastAPI app over one `Generation`; `model_names` are the ids it answers to (the first
    is the one `/v1/models` lists)."""

    def __init__(self, generation: Generation, *, model_names: list[str], ready: Callable[[], bool],
                 metrics_text: Callable[[], bytes], api_key: str | None = None):
        self.generation = generation
        self.model = model_names[0]
        self.model_names = set(model_names)
        self.api_key = api_key
        self.app = app = FastAPI(title="dsjax", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RequestValidationError)
        async def bad_body(request: Request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            if first.get("type") == "json_invalid":
                return _error(400, f"the request body is not valid JSON ({first.get('msg')} at character "
                                   f"{first.get('loc', ('', '?'))[-1]})")
            field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
            return _error(400, f"{field}: {first.get('msg', 'invalid request body')}", param=field)

        @app.exception_handler(StarletteHTTPException)
        async def refused(request: Request, exc: StarletteHTTPException):
            """Starlette's own refusals in OpenAI's error body too: a body that is not UTF-8 (FastAPI's
            "There was an error parsing the body"), an unknown path or method."""
            message = str(exc.detail)
            if exc.status_code == 400 and exc.__cause__ is not None:
                message = f"the request body is not valid JSON ({exc.__cause__})"
            kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
            response = _error(exc.status_code, message, kind=kind)
            response.headers.update(exc.headers or {})
            return response

        @app.get("/health")
        async def health():
            return PlainTextResponse("ok" if ready() else "not ready", status_code=200 if ready() else 503)

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(metrics_text(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request):
            if (denied := self._denied(request)) is not None:
                return denied
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "dsjax"}]}

        @app.post("/v1/completions")
        async def completions(body: oai.CompletionRequest, request: Request):
            return await self._serve(body, request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: oai.ChatCompletionRequest, request: Request):
            return await self._serve(body, request, chat=True)

    def _denied(self, request: Request) -> JSONResponse | None:
        """401 unless the request carries the API key (when the server has one). A check in each
        /v1 route, not an HTTP middleware: Starlette's middleware re-streams every SSE chunk
        through a memory channel, which took the HTTP front from 0.98-1.02x of gRPC's throughput
        at capacity down to 0.91-0.92x (docs/serving.md)."""
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            return _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                          kind="authentication_error", code="invalid_api_key")
        return None

    async def _serve(self, body: oai.CompletionRequest | oai.ChatCompletionRequest, request: Request, *, chat: bool):
        if (denied := self._denied(request)) is not None:
            return denied
        if body.model not in self.model_names:
            return _error(404, f"The model `{body.model}` does not exist: this server serves `{self.model}`",
                          param="model", code="model_not_found")
        try:
            if (problem := body.unsupported()) is not None:
                raise ValueError(problem)
            generate = body.to_proto(self.generation.tokenizer) if chat else body.to_proto()
        except ValueError as e:  # counted with the shared validation's refusals (dsjax_request_errors)
            return _from_generate_error(self.generation.error(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
        try:  # validation tokenizes the prompt: off the event loop
            stream = await asyncio.to_thread(self.generation.start, generate)
        except GenerateError as e:
            return _from_generate_error(e)
        if body.stream:
            return StreamingResponse(self._events(stream, request, body, chat), media_type="text/event-stream")
        text, ids, finish = [], [], None
        try:
            async with contextlib.aclosing(_outputs(stream, request)) as outputs:
                async for out in outputs:
                    text.append(out.text)
                    ids += out.token_ids
                    finish = out.finish_reason
        except GenerateError as e:
            return _from_generate_error(e)
        if finish is None:  # the client left before the end: nobody reads an answer
            return _error(499, "client closed the request", kind="client_closed")
        use = oai.usage(len(stream.prompt_token_ids), len(ids))
        name = oai.FINISH_NAMES.get(finish)
        ids = ids if body.return_token_ids else None
        if chat:
            return oai.chat_completion(stream.request_id, self.model, "".join(text), name, use, ids)
        return oai.completion(stream.request_id, self.model, "".join(text), name, use, chunk=False, token_ids=ids)

    async def _events(self, stream: GenerateStream, request: Request, body, chat: bool) -> AsyncIterator[str]:
        rid, count = stream.request_id, 0
        if chat:
            yield _sse(oai.chat_chunk(rid, self.model, {"role": "assistant", "content": ""}, None))
        try:
            # aclosing: when a send to a gone client fails, the outputs close at once (and cancel)
            async with contextlib.aclosing(_outputs(stream, request)) as outputs:
                async for out in outputs:
                    count += len(out.token_ids)
                    name = oai.FINISH_NAMES.get(out.finish_reason)
                    ids = out.token_ids if body.return_token_ids else None
                    if not out.text and name is None and not ids:  # text held back (split character)
                        continue
                    if chat:
                        yield _sse(oai.chat_chunk(rid, self.model, {"content": out.text} if out.text else {}, name, ids))
                    else:
                        yield _sse(oai.completion(rid, self.model, out.text, name, None, chunk=True, token_ids=ids))
        except GenerateError as e:  # the status line is gone: the error travels as an event
            yield _sse(oai.error_body(e.message, kind="server_error", code=e.code.name.lower()))
            return
        if body.include_usage:
            yield _sse(oai.usage_chunk(rid, self.model, oai.usage(len(stream.prompt_token_ids), count), chat=chat))
        yield "data: [DONE]\n\n"


class HttpServer:
    """uvicorn serving an `OpenAIApp` from a thread; `port` 0 picks a free one (see `.port`). With
    `ssl_certfile` and `ssl_keyfile` (PEM files) it serves HTTPS."""

    def __init__(self, api: OpenAIApp, *, host: str, port: int, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None):
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host.strip("[]"), port))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(api.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2,
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="http", daemon=True)

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
