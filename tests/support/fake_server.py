"""A scripted `dsjax.v1.Generation` server with known timings, to check the benchmark itself.

    with FakeServer(FakeTiming(prefill_fixed_s=0.02, tpot_s=0.005)) as server:
        run = run_load(server.target, requests, offsets, rate=10.0)

The model is one FIFO prefill queue with deterministic service times and unlimited decode:
request i arriving at a_i starts prefill at s_i = max(a_i, f_{i-1}) (virtual time, so sleep jitter
never accumulates), its first token is due at f_i = s_i + prefill_fixed_s + prefill_s_per_token *
prompt_len, and token k at f_i + k * tpot_s. The servicer sleeps until each due time and streams
one token per message; the last message carries finish_reason LENGTH and a LatencyBreakdown
(queue s_i - a_i, prefill f_i - s_i, decode (n - 1) * tpot_s).

`FakeTiming.expected(...)` replays the same queue offline on a send schedule and returns the
`RequestRecord`s an ideal client would see, the known answer the tests compare measurements with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence

import grpc
import grpc.aio

from dsjax.bench.metrics import RequestRecord
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc as pb_grpc


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeTiming:
    prefill_fixed_s: float = 0.01
    prefill_s_per_token: float = 0.0
    tpot_s: float = 0.005

    def __post_init__(self) -> None:
        if self.prefill_fixed_s < 0 or self.prefill_s_per_token < 0 or self.tpot_s < 0:
            raise ValueError(f"timings must be >= 0, got {self}")

    def service_s(self, prompt_len: int) -> float:
        return self.prefill_fixed_s + self.prefill_s_per_token * prompt_len

    def expected(self, send_s: Sequence[float], lengths: Sequence[tuple[int, int]]) -> list[RequestRecord]:
        """Records of an ideal client: request i sent (and arrived) at send_s[i], in that order."""
        free_at = float("-inf")
        out = []
        for t, (prompt_len, output_len) in zip(send_s, lengths):
            first = max(t, free_at) + self.service_s(prompt_len)
            free_at = first
            times = [first + k * self.tpot_s for k in range(output_len)]
            out.append(RequestRecord(send_s=t, token_times_s=tuple(times), prompt_len=prompt_len, output_len=output_len))
        return out


class FakeGenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, timing: FakeTiming):
        self.timing = timing
        self._free_at = float("-inf")  # virtual time the prefill queue drains
        self.num_requests = 0

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        arrival = time.perf_counter()
        wall_arrival = time.time()
        ids = request.token_ids.ids if request.HasField("token_ids") else request.text.encode()
        n = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
        if not ids or n < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"empty prompt or max_tokens={n} < 1")
        self.num_requests += 1
        start = max(arrival, self._free_at)
        first = start + self.timing.service_s(len(ids))
        self._free_at = first
        for k in range(n):
            due = first + k * self.timing.tpot_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            msg = pb.GenerateResponse(request_id=request.request_id, token_ids=[k % 256])
            msg.timing.arrival_time = wall_arrival
            msg.timing.first_token_time = wall_arrival + (first - arrival)
            msg.timing.time = time.time()
            if k == n - 1:
                msg.finish_reason = pb.LENGTH
                msg.breakdown.queue_seconds = start - arrival
                msg.breakdown.prefill_seconds = first - start
                msg.breakdown.decode_seconds = (n - 1) * self.timing.tpot_s
            yield msg


class FakeServer:
    """A `FakeGenerationServicer` on 127.0.0.1 (a free port), served from a background thread."""

    def __init__(self, timing: FakeTiming, port: int = 0):
        self.servicer = FakeGenerationServicer(timing)
        self._port = port
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-generation", daemon=True)
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self._port}")
        await self._server.start()

    def start(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace=None), self._loop).result(timeout=10)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
