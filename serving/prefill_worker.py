"""A prefill worker: one `PrefillInstance` (its own mesh of this host's devices) behind the
`PrefillWorker` service.

    (checks)  -> every request is checked first (serving/worker_checks.py): INVALID_ARGUMENT
                 naming the field, before the engine thread sees it
    Prefill   -> queued FCFS; the engine thread batches and runs prompts; the reply carries the
                 sampled token and, unless the request ended there, a KV descriptor and a lease
    (staging) -> right after the prefill step, on the engine thread, each held request's blocks
                 are gathered into device arrays of their own (the runner's `stage_kv`), while
                 the staged total stays under `max_staged_bytes`
    PullKV    -> a staged request is copied to host and streamed by the handler thread at once,
                 without waiting for the engine thread to finish its current prefill (under load
                 that wait was most of a transfer); an unstaged one is exported by the engine
                 thread between steps. Chunks: serving/kv_transfer.py. Renews the lease
    ReleaseKV -> frees the blocks (the decode side inserted them, or the request was aborted);
                 also drops a request still queued for prefill
    (expiry)  -> a lease nobody renewed or released frees its blocks; a later pull gets NOT_FOUND;
                 renewals never keep a lease past `max_lease_s` (serving/leases.py)

Blocks are allocated, read (staged, exported) and freed only on the engine thread, so a transfer
never reads a freed block: a release that arrives during an export runs after it, and a staged
copy is independent of the pool (a handler still holding one after the release reads valid data).
The blocks stay allocated while a request is staged, so staging never lets the prefill admit more
than its pool holds; the staged copies are extra device memory, bounded by `max_staged_bytes`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future

import grpc

from dsjax.engine.block_manager import blocks_for
from dsjax.engine.disaggregated import PrefillInstance
from dsjax.engine.request import Request, Status
from dsjax.engine.sampling_params import SamplingParams
from dsjax.runtime.kv_descriptor import KVDescriptor
from serving.engine_loop import EngineDead, EngineLoop
from serving.kv_transfer import DEFAULT_CHUNK_BYTES, descriptor_to_proto, to_chunks
from serving.leases import LeaseTable
from serving.messages import FINISH_TO_PROTO, host_time_fields
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.worker_checks import Invalid, WorkerLimits, check_ids, pull_chunk_bytes, worker_request

log = logging.getLogger(__name__)


class _Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclasses.dataclass
class _Pending:
    request: Request
    future: Future
    arrival: float


class PrefillWorker(EngineLoop, worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, instance: PrefillInstance, *, worker_id: str, lease_s: float = 30.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_waiting: int = 1024, max_staged_bytes: int = 512 << 20,
                 max_lease_s: float | None = None):
        super().__init__(f"prefill-engine-{worker_id}")
        self.max_staged_bytes = max_staged_bytes
        self._staged: dict[str, tuple[KVDescriptor, object]] = {}  # written by the engine thread
        self._staged_lock = threading.Lock()
        self._staged_bytes = 0
        self.inst = instance
        self.worker_id = worker_id
        self.chunk_bytes = chunk_bytes
        self.max_waiting = max_waiting
        self.leases: LeaseTable[Request] = LeaseTable(lease_s, max_hold_s=max_lease_s)
        self.limits = WorkerLimits.of(instance, chunk_bytes)  # what its handlers accept (serving/worker_checks.py)
        self._pending: dict[str, _Pending] = {}
        self._inflight: deque = deque()  # launched prefill batches, oldest first (the pipeline)
        self.migrations = 0
        self.kv_bytes = 0  # the runner's bytes (an emulated device's: the real model's, not the placeholder's)

    # ---- gRPC handlers (server threads) ----------------------------------------------------
    def Prefill(self, request, context):  # noqa: N802
        fut: Future = Future()
        try:
            req = worker_request(request.request, self.limits)
            self.post(lambda: self._add(req, fut), on_error=lambda e: fut.done() or fut.set_exception(e))
            context.add_callback(lambda: self._post_quietly(lambda: self._drop_pending(req.request_id)))
            return fut.result()
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except _Rejected as e:
            context.abort(e.code, e.message)
        except EngineDead as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    def PullKV(self, request, context):  # noqa: N802
        rid = request.request_id
        try:
            chunk_bytes = pull_chunk_bytes(request, self.limits)
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self._staged_lock:
            staged = self._staged.get(rid)
        if staged is not None:
            if self.error is not None:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine of {self.worker_id} died: {self.error!r}")
            self._post_quietly(lambda: self._pulled(rid, self.inst.runner.kv_bytes(staged[0].num_tokens)))
            desc, (k, v) = staged[0], self.inst.runner.kv_to_host(staged[1])
        else:
            try:
                desc, k, v = self.call(lambda: self._export(rid), timeout=None)
            except EngineDead as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except KeyError:
                context.abort(grpc.StatusCode.NOT_FOUND, f"{self.worker_id} holds no KV for request {rid!r} "
                                                          "(released, lease expired, or never prefilled)")
        yield from to_chunks(desc, k, v, chunk_bytes)

    def RenewLease(self, request, context):  # noqa: N802
        ids = self._lease_ids(request, context)
        return wpb.LeaseResponse(unknown_ids=self.call(lambda: [r for r in ids if not self.leases.renew(r)]))

    def ReleaseKV(self, request, context):  # noqa: N802
        ids = self._lease_ids(request, context)
        return wpb.LeaseResponse(unknown_ids=self.call(lambda: [r for r in ids if not self._release(r)]))

    @staticmethod
    def _lease_ids(request, context) -> list[str]:
        try:
            return check_ids(request.request_ids)
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    # ---- engine thread ---------------------------------------------------------------------
    def _add(self, req: Request, fut: Future) -> None:
        rid = req.request_id
        try:
            if rid in self._pending or rid in self.leases:
                raise _Rejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id={rid!r} is already on {self.worker_id}")
            need, cap = blocks_for(req.num_tokens, self.inst.blocks.block_size), self.inst.blocks.capacity_blocks
            if need > cap:
                raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{req.num_tokens} tokens need {need} KV blocks, "
                                                                  f"prefill worker {self.worker_id} has {cap}")
            if len(self.inst.waiting) >= self.max_waiting:
                raise _Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill queue of {self.worker_id} is full ({self.max_waiting})")
        except _Rejected as e:
            fut.set_exception(e)
            return
        self._pending[rid] = _Pending(req, fut, req.lifecycle.arrival)  # since the call arrived (the handler built it)
        self.inst.waiting.append(req)

    def _drop_pending(self, rid: str) -> None:
        """The Prefill call ended: if it ended before the prefill ran (cancelled), drop it."""
        p = self._pending.pop(rid, None)
        if p is not None:
            p.request.status = Status.FINISHED  # if its batch is in flight, its result is dropped
            self.inst.release(p.request)
            p.future.set_exception(_Rejected(grpc.StatusCode.CANCELLED, "cancelled"))

    def _unstage(self, rid: str) -> None:
        with self._staged_lock:
            gone = self._staged.pop(rid, None)
        if gone is not None:
            self._staged_bytes -= gone[0].nbytes

    def _stage(self, req: Request) -> None:
        """Gather a held request's KV off the pool now, if the staging budget allows."""
        desc = self._descriptor(req)
        if self._staged_bytes + desc.nbytes > self.max_staged_bytes:
            return
        table = self.inst.blocks.block_table(req.request_id)[: desc.num_blocks]
        staged = self.inst.runner.stage_kv(table)  # dispatched; ordered before later pool writes
        self._staged_bytes += desc.nbytes
        with self._staged_lock:
            self._staged[req.request_id] = (desc, staged)

    def _pulled(self, rid: str, nbytes: int) -> None:
        if self.leases.renew(rid):
            self.migrations += 1
            self.kv_bytes += nbytes

    def _release(self, rid: str) -> bool:
        self._unstage(rid)
        req = self.leases.pop(rid)
        if req is not None:
            self.inst.release(req)
            return True
        p = self._pending.get(rid)
        if p is not None:
            self._drop_pending(rid)
            return True
        return False

    def _export(self, rid: str):
        req = self.leases.get(rid)
        if req is None:
            raise KeyError(rid)
        self.leases.renew(rid)
        desc = self._descriptor(req)
        k, v = self.inst.runner.export_kv(self.inst.blocks.block_table(rid)[: desc.num_blocks])
        self.migrations += 1
        self.kv_bytes += self.inst.runner.kv_bytes(desc.num_tokens)
        return desc, k, v

    def _descriptor(self, req: Request) -> KVDescriptor:
        return self.inst.runner.kv_descriptor(req.num_tokens - 1)  # the last token's KV is decode's to write

    def busy(self) -> bool:
        return bool(self.inst.waiting or self._inflight)

    def step(self) -> bool:
        """Keep the pipeline full (the simulator's SimPrefillInstance; the in-process engine's
        dsjax/engine/threaded.py): launch one batch whenever the first stage can take it (fewer
        than pp batches in flight, or, on a runner that says when its first stage frees, that
        moment), else finish the oldest batch in flight. A batch is formed only when it can start,
        so it takes what arrived meanwhile; commands (new prompts, releases) run between steps."""
        inst, inflight = self.inst, self._inflight
        runner = inst.runner
        stage_free_in = getattr(runner, "stage_free_in", None)
        if inst.waiting:
            wait = stage_free_in() if stage_free_in is not None else (0.0 if len(inflight) < runner.pp else None)
            if wait is not None and wait <= 0.0:
                pending = inst.launch(max_batches=1)
                if pending is not None:
                    inflight.append(pending)
                    return True
            elif wait is not None and (not inflight or wait < runner.ready_in(inflight[0][1])):
                time.sleep(wait)  # the first stage frees before the oldest batch is done
                return True
        if not inflight:
            return False
        if not inst.waiting and stage_free_in is not None and (left := runner.ready_in(inflight[0][1])) > 0:
            self._drain(block=True, timeout=left)  # a prompt arriving meanwhile may enter the first stage first
            return True
        pending = inflight.popleft()
        return self._respond(*inst.complete(pending, runner.collect(pending[1])))

    def _respond(self, prefilled: list[Request], finished: list[Request]) -> bool:
        for req in prefilled + finished:
            p = self._pending.pop(req.request_id)
            lc = req.lifecycle
            resp = wpb.PrefillResponse(token_id=req.output_token_ids[-1], queue_seconds=lc.prefill_start - p.arrival,
                                       prefill_seconds=lc.prefill_end - lc.prefill_start)
            if req.finish_reason is not None:
                resp.finish_reason = FINISH_TO_PROTO[req.finish_reason]
            else:
                self.leases.hold(req.request_id, req)
                self._stage(req)
                resp.kv.CopyFrom(descriptor_to_proto(self._descriptor(req)))
                resp.lease_ms = int(self.leases.lease_s * 1000)
            p.future.set_result(resp)
        return bool(prefilled or finished)

    def tick(self) -> None:
        for rid, req in self.leases.pop_expired():
            log.warning("%s: KV lease of %s expired unpulled; freeing its blocks", self.worker_id, rid)
            self._unstage(rid)
            self.inst.release(req)

    def fail_all(self, error: BaseException) -> None:
        for p in self._pending.values():
            p.future.set_exception(_Rejected(grpc.StatusCode.INTERNAL, f"prefill engine failed: {error!r}"))
        self._pending.clear()

    def stats(self, timeout: float = 10.0) -> wpb.InstanceStats:
        def collect():
            b, r = self.inst.blocks, self.inst.runner
            return wpb.InstanceStats(
                worker_id=self.worker_id, role=wpb.PREFILL, pid=os.getpid(), tp=len(r.devices()) // r.pp, pp=r.pp,
                num_blocks=b.capacity_blocks, free_blocks=b.num_free_blocks, waiting=len(self.inst.waiting),
                held=len(self.leases), migrations=self.migrations, kv_bytes=self.kv_bytes,
                leases_expired=self.leases.num_expired, alive=True, **host_time_fields(r),
            )

        return self.call(collect, timeout=timeout)

    def warmup(self, prompt_len: int = 8) -> None:
        """Compile the prefill program and the KV export for a short prompt."""
        req = Request(request_id="warmup", prompt_token_ids=[1] * prompt_len, seed=0,
                      sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        fut: Future = Future()
        self.post(lambda: self._add(req, fut), on_error=lambda e: fut.done() or fut.set_exception(e))
        fut.result()

        def export_and_release():
            self._export("warmup")
            self._release("warmup")
            self.migrations = self.kv_bytes = 0

        self.call(export_and_release, timeout=None)
