"""The load generator: one asyncio loop sends a request schedule and times every token.

    offsets = send_schedule(len(requests), rate=4.0, seed=0)           # seconds from the start
    run = run_load("localhost:50051", requests, offsets, rate=4.0)      # -> LoadRun
    run = run_load("http://localhost:8000", requests, offsets, rate=4.0)  # any OpenAI-compatible server
    run.records                                                          # metrics.RequestRecord

Each request is one `dsjax.v1.Generation/Generate` stream (greedy, EOS ignored, max_tokens =
output_len), or, for an `http://` target, one streamed `/v1/completions` through the official
`openai` client with the same parameters (vLLM's `ignore_eos`, and `return_token_ids` so a chunk's
tokens are counted, not guessed; a server without it counts one token a chunk, corrected by the
final usage). Times are client-side `time.perf_counter()` readings relative to the schedule's start:
`send_s` just before the call is started, and one receive time per streamed message (a message with
k tokens gives k tokens that time), so TTFT includes the network and the router, as a user sees it.
The last message's `LatencyBreakdown` (queue / prefill / transfer / decode on the server) is kept.

The client stays lean so it is not the bottleneck on a small machine: one event loop, one channel
per target, no per-token work beyond appending (time, count); `LoadRun.send_lag_*` report how late requests
left against their schedule, so an overloaded client shows up in the results.

Early stop (`StopRule`): once more requests have *certainly* missed the SLOs than the attainment
target allows (a request without a first token past the TTFT SLO, or whose TPOT already exceeds
the SLO even if its last token came now), the run cannot reach the target: the rest is cancelled
and never sent, recorded as failures. The pass/fail verdict is exact; the attainment is then a
lower bound (`LoadRun.stopped_early`). Goodput bisection uses it to skip overloaded rates quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Sequence

import grpc
import grpc.aio
import numpy as np
from tqdm import tqdm

from dsjax.bench.metrics import RequestRecord, meets_tpot, meets_ttft
from dsjax.bench.records import BenchRequest, Breakdown, LoadRun, RequestResult
from dsjax.workloads.trace_gen import TraceConfig, arrival_times
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc as pb_grpc

DEFAULT_REQUEST_TIMEOUT_S = 600.0
_MONITOR_PERIOD_S = 0.2


def send_schedule(num_requests: int, *, rate: float, arrival: str = "poisson", cv: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Send offsets in seconds: the first request at 0, then i.i.d. gaps of mean 1/rate.

    Poisson: exponential gaps; gamma: coefficient of variation `cv` (bursty for cv > 1). With one
    seed the gaps at every rate are the same unit-rate gaps divided by the rate, so a rate sweep
    replays one arrival pattern compressed or stretched (`dsjax.workloads.arrival_times`).
    """
    config = TraceConfig(rate=rate, arrival=arrival, cv=cv if arrival == "gamma" else 1.0, seed=seed)
    return arrival_times(num_requests, config)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopRule:
    """Stop a run once it certainly misses `target` joint attainment under these SLOs."""

    ttft_slo_s: float
    tpot_slo_s: float
    target: float = 0.9

    def allowed_misses(self, num_requests: int) -> int:
        return math.floor((1 - self.target) * num_requests + 1e-9)


class _Tracker:
    """Mutable per-request state, touched only from the event loop."""

    __slots__ = ("req", "scheduled_s", "send_s", "messages", "first_s", "last", "finish", "error", "done", "_missed")

    def __init__(self, req: BenchRequest, scheduled_s: float):
        self.req, self.scheduled_s = req, scheduled_s
        self.send_s: float | None = None
        self.messages: list[tuple[float, int]] = []
        self.first_s: float | None = None
        self.last: pb.GenerateResponse | None = None  # gRPC only
        self.finish = "NONE"  # the finish reason, as the proto names it
        self.error: str | None = None
        self.done = False
        self._missed: bool | None = None  # verdict once done (computed once)

    @contextlib.contextmanager
    def in_flight(self, send_s: float):
        """The request was sent at `send_s`; on leaving it is done (a run stopped early says so)."""
        self.send_s = send_s
        try:
            yield
        except asyncio.CancelledError:
            self.error = "cancelled: run stopped early"
            raise
        finally:
            self.done = True

    def add_tokens(self, now: float, n: int) -> None:
        """`n` tokens received at `now` (seconds since the run's start); 0 is ignored."""
        if n:
            if self.first_s is None:
                self.first_s = now
            self.messages.append((now, n))

    def certainly_missed(self, now: float, rule: StopRule) -> bool:
        if self.send_s is None:
            return False
        if self.done:
            if self._missed is None:
                rec = self.record()
                self._missed = not (meets_ttft(rec, rule.ttft_slo_s) and meets_tpot(rec, rule.tpot_slo_s))
            return self._missed
        if self.first_s is None:
            return now - self.send_s > rule.ttft_slo_s
        if self.first_s - self.send_s > rule.ttft_slo_s:
            return True
        n = self.req.output_len
        return n > 1 and (now - self.first_s) / (n - 1) > rule.tpot_slo_s

    def record(self) -> RequestRecord:
        return RequestRecord.from_messages(
            send_s=self.scheduled_s if self.send_s is None else self.send_s, messages=self.messages,
            prompt_len=self.req.prompt_len, output_len=self.req.output_len, error=self.error,
        )


def generate_request(req: BenchRequest, request_id: str) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
    if req.prompt_token_ids is not None:
        return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=req.prompt_token_ids), sampling=sampling)
    return pb.GenerateRequest(request_id=request_id, text=req.prompt_text, sampling=sampling)


async def _one(stub: pb_grpc.GenerationStub, tr: _Tracker, request_id: str, t0: float, timeout_s: float) -> None:
    clock = time.perf_counter
    msg_req = generate_request(tr.req, request_id)
    with tr.in_flight(clock() - t0):
        try:
            async for msg in stub.Generate(msg_req, timeout=timeout_s):
                tr.add_tokens(clock() - t0, len(msg.token_ids))
                tr.last = msg
                tr.finish = pb.FinishReason.Name(msg.finish_reason)
            _check_count(tr)
        except grpc.aio.AioRpcError as e:
            tr.error = f"{e.code().name}: {e.details()}"


def _check_count(tr: _Tracker) -> None:
    got = sum(n for _, n in tr.messages)
    if got != tr.req.output_len:
        tr.error = f"received {got} of {tr.req.output_len} tokens (finish_reason {tr.finish})"


async def _one_http(client, model: str, tr: _Tracker, request_id: str, t0: float, timeout_s: float) -> None:
    """One streamed `/v1/completions` request (an `openai.AsyncOpenAI` client); times as `_one`."""
    import openai

    clock = time.perf_counter
    req = tr.req
    prompt = list(req.prompt_token_ids) if req.prompt_token_ids is not None else req.prompt_text
    with tr.in_flight(clock() - t0):
        try:
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=req.output_len, temperature=0.0, stream=True, timeout=timeout_s,
                stream_options={"include_usage": True}, user=request_id,
                extra_body={"ignore_eos": True, "return_token_ids": True})
            usage = None
            async for chunk in stream:
                now = clock() - t0
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    ids = (choice.model_extra or {}).get("token_ids")
                    tr.add_tokens(now, len(ids) if ids is not None else (1 if choice.text else 0))
                    if choice.finish_reason:
                        tr.finish = choice.finish_reason.upper()
            got = sum(n for _, n in tr.messages)
            if usage is not None and tr.messages and usage.completion_tokens != got:  # chunks were not tokens
                t_last, n_last = tr.messages[-1]
                tr.messages[-1] = (t_last, n_last + usage.completion_tokens - got)
            _check_count(tr)
        except openai.APIError as e:
            tr.error = f"HTTP {getattr(e, 'status_code', '?')}: {e.message}"


def _result(tr: _Tracker, request_id: str, started_at: float) -> RequestResult:
    breakdown = server_ttft = server_arrival = None
    if tr.last is not None:
        if tr.last.HasField("breakdown"):
            breakdown = Breakdown.from_proto(tr.last.breakdown)
        timing = tr.last.timing
        if timing.first_token_time > 0 and timing.arrival_time > 0:
            server_ttft = timing.first_token_time - timing.arrival_time
        if timing.arrival_time > 0:
            server_arrival = timing.arrival_time - started_at
    if tr.send_s is None and tr.error is None:
        tr.error = "not sent: run stopped early"
    return RequestResult(index=tr.req.index, request_id=request_id, scheduled_s=tr.scheduled_s, record=tr.record(),
                         breakdown=breakdown, server_ttft_s=server_ttft, finish_reason=tr.finish,
                         server_arrival_s=server_arrival)


async def run_load_async(
    target: str | Sequence[str],
    requests: Sequence[BenchRequest],
    offsets_s: Sequence[float],
    *,
    rate: float,
    stop_rule: StopRule | None = None,
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    progress: bool = True,
    tag: str = "bench",
    connect_timeout_s: float = 30.0,
) -> LoadRun:
    """Sends `requests[i]` at `offsets_s[i]` seconds after the start; returns when all are done.

    `target`: one address, or several replicas of one service: each request then goes to the
    replica with the fewest requests in flight (ties to the lowest index), as a load balancer would.
    """
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("no target to send to")
    if len(requests) != len(offsets_s):
        raise ValueError(f"{len(requests)=} requests but {len(offsets_s)=} send offsets")
    if any(b < a for a, b in zip(offsets_s, offsets_s[1:])):
        raise ValueError("send offsets must be non-decreasing")
    trackers = [_Tracker(r, float(t)) for r, t in zip(requests, offsets_s)]
    ids = [f"{tag}-{r.index}" for r in requests]
    senders: list = []  # per target: an async fn(tracker, request_id, t0, timeout_s)
    closers: list = []
    try:
        for t in targets:
            send, close = await (_http_sender(t, connect_timeout_s) if t.startswith(("http://", "https://"))
                                 else _grpc_sender(t, connect_timeout_s))
            senders.append(send)
            closers.append(close)
        in_flight = [0] * len(senders)
        bar = tqdm(total=len(trackers), desc=f"{tag} @ {rate:g} req/s", unit="req", leave=False, disable=not progress)
        tasks: list[asyncio.Task] = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        started_at = time.time()

        def finished(k: int) -> None:
            in_flight[k] -= 1
            bar.update(1)

        async def dispatch() -> None:
            for tr, rid in zip(trackers, ids):
                delay = tr.scheduled_s - (time.perf_counter() - t0)
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                if stop.is_set():
                    return
                k = min(range(len(senders)), key=in_flight.__getitem__)
                in_flight[k] += 1
                task = asyncio.create_task(senders[k](tr, rid, t0, timeout_s))
                task.add_done_callback(lambda _t, k=k: finished(k))
                tasks.append(task)

        async def monitor() -> None:
            allowed = stop_rule.allowed_misses(len(trackers))  # type: ignore[union-attr]
            while not stop.is_set():
                now = time.perf_counter() - t0
                if sum(tr.certainly_missed(now, stop_rule) for tr in trackers) > allowed:  # type: ignore[arg-type]
                    stop.set()
                    for task in tasks:
                        task.cancel()
                    return
                await asyncio.sleep(_MONITOR_PERIOD_S)

        watcher = asyncio.create_task(monitor()) if stop_rule is not None else None
        await dispatch()
        # dispatch has returned, so `tasks` is final.
        await asyncio.gather(*tasks, return_exceptions=True)
        stopped = stop.is_set()
        stop.set()
        if watcher is not None:
            await watcher
        wall = time.perf_counter() - t0
        bar.close()
    finally:
        for close in closers:
            await close()
    lags = [tr.send_s - tr.scheduled_s for tr in trackers if tr.send_s is not None]
    return LoadRun(
        rate=rate,
        results=tuple(_result(tr, rid, started_at) for tr, rid in zip(trackers, ids)),
        wall_s=wall,
        stopped_early=stopped,
        send_lag_p99_s=float(np.percentile(lags, 99)) if lags else math.nan,
        send_lag_max_s=max(lags) if lags else math.nan,
        started_at=started_at,
    )


async def _grpc_sender(target: str, connect_timeout_s: float):
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    channel = grpc.aio.insecure_channel(target, options=options)
    try:
        await asyncio.wait_for(channel.channel_ready(), connect_timeout_s)
    except asyncio.TimeoutError:
        await channel.close()
        raise ConnectionError(f"no gRPC server answered at {target} within {connect_timeout_s} s") from None
    stub = pb_grpc.GenerationStub(channel)
    return (lambda tr, rid, t0, timeout_s: _one(stub, tr, rid, t0, timeout_s)), channel.close


async def _http_sender(base_url: str, connect_timeout_s: float):
    """An OpenAI-compatible server: the model is the first `/v1/models` lists; the API key is
    $OPENAI_API_KEY if set."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=os.environ.get("OPENAI_API_KEY") or "none",
                                max_retries=0)
    try:
        models = await client.models.list(timeout=connect_timeout_s)
        model = models.data[0].id
    except (openai.APIError, IndexError) as e:
        await client.close()
        raise ConnectionError(f"no OpenAI-compatible server with a model answered at {base_url}: {e}") from None
    return (lambda tr, rid, t0, timeout_s: _one_http(client, model, tr, rid, t0, timeout_s)), client.close


_LOOP: asyncio.AbstractEventLoop | None = None


def run_load(target: str | Sequence[str], requests: Sequence[BenchRequest], offsets_s: Sequence[float], **kwargs) -> LoadRun:
    """Blocking wrapper of `run_load_async`, for one thread.

    Every call runs on one long-lived event loop: grpc.aio delivers late completion events to the
    loop a channel was used on, so closing a loop per run (asyncio.run) makes it log
    "Event loop is closed" errors after the run.
    """
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(run_load_async(target, requests, offsets_s, **kwargs))
