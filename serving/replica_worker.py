"""A replica worker: one `ColocatedEngine` (colocated or chunked) behind the `ReplicaWorker`
service, so the baselines run as the disaggregated workers do, one process per instance with its
own interpreter, behind the same router.

    Generate -> checked (serving/worker_checks.py: INVALID_ARGUMENT naming the field)
             -> queued on the engine (prefill first, vLLM's rule, or chunked prefill)
             -> tokens streamed back after every step, the first with its queue and prefill
                seconds; the finish with how often the replica preempted the request (out of KV
                blocks: it is prefilled again here, over everything it holds)

The router owns the request: if this process dies, the router sends prompt + tokens so far to
another replica (serving/remote.py). A cancelled call aborts the request and frees its blocks
on the engine thread, between steps.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import grpc

from dsjax.engine.colocated import ColocatedEngine
from dsjax.engine.request import FinishReason, Request
from dsjax.engine.sampling_params import SamplingParams
from serving.engine_loop import EngineDead, EngineLoop, ErrorEvent, FinishEvent, Outbox, TokenEvent
from serving.messages import FINISH_TO_PROTO, host_time_fields
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.worker_checks import Invalid, WorkerLimits, worker_request

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Entry:
    request: Request
    outbox: Outbox
    arrival: float
    sent: int  # output tokens already streamed (a recomputed request arrives with some)
    timed: bool = False  # queue and prefill seconds sent


class ReplicaWorker(EngineLoop, worker_pb2_grpc.ReplicaWorkerServicer):
    def __init__(self, engine: ColocatedEngine, *, worker_id: str, chunk_bytes: int = 0):
        super().__init__(f"replica-engine-{worker_id}")
        self.engine = engine
        self.worker_id = worker_id
        self.limits = WorkerLimits.of(engine, chunk_bytes)
        self._entries: dict[str, _Entry] = {}
        self.served = 0

    # ---- gRPC handler (server threads) ---------------------------------------------------
    def Generate(self, request, context):  # noqa: N802
        try:
            req = worker_request(request.request, self.limits)
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid, outbox = req.request_id, Outbox()
        try:
            self.post(lambda: self._admit(req, outbox),
                      on_error=lambda e: outbox.put(ErrorEvent(grpc.StatusCode.INTERNAL, f"admitting the request failed: {e!r}")))
        except EngineDead as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        context.add_callback(lambda: self._post_quietly(lambda: self._abort(rid)))
        for ev in outbox:
            if isinstance(ev, TokenEvent):
                yield wpb.ReplicaResponse(token_ids=ev.token_ids, **(ev.timing or {}))
            elif isinstance(ev, FinishEvent):
                yield wpb.ReplicaResponse(finish_reason=FINISH_TO_PROTO[ev.reason],
                                          recomputes=(ev.breakdown or {}).get("recomputes", 0))
            else:
                context.abort(ev.code, ev.message)

    # ---- engine thread -------------------------------------------------------------------
    def _admit(self, req: Request, outbox: Outbox) -> None:
        rid = req.request_id
        if rid in self._entries:
            outbox.put(ErrorEvent(grpc.StatusCode.ALREADY_EXISTS, f"request_id={rid!r} is already on {self.worker_id}"))
            return
        try:
            self.engine.add_request(req)
        except ValueError as e:  # more KV than this replica has
            outbox.put(ErrorEvent(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            return
        # Queued since the call arrived (the handler built the request), not since this command ran:
        # a prompt that arrives during a step waits for it, and that wait is the engine's queue.
        self._entries[rid] = _Entry(req, outbox, req.lifecycle.arrival, sent=len(req.output_token_ids))

    def _abort(self, rid: str) -> None:
        e = self._entries.pop(rid, None)
        if e is not None:
            self.engine.abort(rid)
            e.outbox.put(FinishEvent(FinishReason.CANCELLED))

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> bool:
        finished = {id(r) for r in self.engine.step()}
        for rid, e in list(self._entries.items()):
            out = e.request.output_token_ids
            if len(out) > e.sent:
                timing = None
                if not e.timed:  # the first token of this call: how long it queued and prefilled here
                    lc = e.request.lifecycle
                    timing = {"queue_seconds": lc.prefill_start - e.arrival, "prefill_seconds": lc.prefill_end - lc.prefill_start}
                    e.timed = True
                e.outbox.put(TokenEvent(tuple(out[e.sent :]), timing=timing))
                e.sent = len(out)
            if id(e.request) in finished:
                del self._entries[rid]
                self.served += 1
                e.outbox.put(FinishEvent(e.request.finish_reason, {"recomputes": e.request.lifecycle.num_preemptions}))
        return True

    def fail_all(self, error: BaseException) -> None:
        for e in self._entries.values():
            e.outbox.put(ErrorEvent(grpc.StatusCode.INTERNAL, f"replica engine failed: {error!r}"))
        self._entries.clear()

    def stats(self, timeout: float = 10.0) -> wpb.InstanceStats:
        def collect():
            e = self.engine
            b, r = e.blocks, e.runner
            return wpb.InstanceStats(
                worker_id=self.worker_id, role=wpb.COLOCATED, pid=os.getpid(), tp=len(r.devices()) // r.pp, pp=r.pp,
                num_blocks=b.capacity_blocks, free_blocks=b.num_free_blocks, waiting=len(e.waiting),
                running=len(e.running), alive=True, **host_time_fields(r),
            )

        return self.call(collect, timeout=timeout)

    def warmup(self, prompt_len: int = 8, max_tokens: int = 4) -> None:
        """Compile the prefill and decode programs for one short request."""
        def run():
            req = Request(request_id="warmup", prompt_token_ids=[1] * prompt_len, seed=0,
                          sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            self.engine.add_request(req)
            while self.engine.has_unfinished():
                self.engine.step()

        self.call(run, timeout=None)
