"""A decode worker: one `DecodeInstance` behind the `DecodeWorker` service; it pulls each
request's KV from the prefill worker that holds it.

    Decode -> checked (serving/worker_checks.py: the request, its KV descriptor, and a source the
              router lists as a registered prefill worker; else INVALID_ARGUMENT)
           -> queued FCFS until the instance has room (`DecodeInstance.can_pull`: the blocks
              plus a growth reserve, DistServe's 5% rule); meanwhile the KV waits on the prefill
              worker, whose lease this worker renews
           -> blocks allocated here, a pull thread streams the KV (PullKV) into host memory
           -> the engine thread puts it on this mesh (resharded to this TP degree) and inserts
              it into the pool (donated), then tells the prefill worker to release its copy
           -> continuous decode batching; tokens streamed back to the router per step

Failure policy: a pull that fails (lease expired, prefill worker gone) and a preemption end the
stream with ABORTED, meaning "the KV is lost, recompute from the tokens streamed so far"; the
router re-prefills. An abort (router cancel) frees this worker's blocks at once, cancels the pull
in flight and releases the prefill worker's copy. Only the engine thread allocates, writes and
frees blocks, so a landing pull for a request aborted meanwhile is simply dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from dsjax.engine.block_manager import blocks_for
from dsjax.engine.disaggregated import DecodeInstance
from dsjax.engine.request import FinishReason, Request, Status
from dsjax.engine.sampling_params import SamplingParams
from serving.channels import Channels
from serving.engine_loop import EngineDead, EngineLoop, ErrorEvent, FinishEvent, Outbox, TokenEvent
from serving.kv_transfer import DEFAULT_CHUNK_BYTES, ChecksumMismatch, KVAssembler, descriptor_from_proto
from serving.messages import FINISH_TO_PROTO, host_time_fields
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.tls import ClusterTLS
from serving.worker_checks import Invalid, Peers, WorkerLimits, kv_source, worker_request

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Entry:
    request: Request
    source: wpb.KVSource
    outbox: Outbox
    arrival: float
    state: str = "queued"  # queued -> pulling -> running
    call: object = None  # the PullKV call while pulling (cancellable from any thread)
    cancelled: bool = False
    sent: int = 0  # output tokens already streamed (the prefill's token included)
    pull_start: float = 0.0


class DecodeWorker(EngineLoop, worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, instance: DecodeInstance, *, worker_id: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 pull_threads: int = 4, pull_timeout_s: float = 60.0, renew_every_s: float = 1.0,
                 cluster_token: str | None = None, tls: ClusterTLS | None = None, peers: Peers | None = None):
        """`peers`: the prefill workers the router lists, the only KV sources a Decode may name
        (None: any, for a worker driven directly, without a router)."""
        super().__init__(f"decode-engine-{worker_id}")
        self.inst = instance
        self.worker_id = worker_id
        self.chunk_bytes = chunk_bytes
        self.pull_timeout_s = pull_timeout_s
        self.renew_every_s = renew_every_s
        self.peers = peers
        self.limits = WorkerLimits.of(instance, chunk_bytes)  # what its handlers accept (serving/worker_checks.py)
        # Pulls from prefill workers: the cluster token, mutual TLS, messages up to one KV chunk.
        self.channels = Channels(cluster_token, tls, max_message=self.limits.message_bytes())
        if peers is not None:
            peers.on_gone = self.channels.retire  # a prefill worker that left (restarts come back on new ports)
        self._pool = ThreadPoolExecutor(pull_threads, thread_name_prefix=f"pull-{worker_id}")
        self._entries: dict[str, _Entry] = {}
        self._queue: deque[str] = deque()
        self._last_renew = time.monotonic()
        self.checksum_failures = 0  # pulls refused for a chunk failing its checksum (engine thread)
        d = instance.runner.kv_descriptor(0)  # what the runner's KV looks like on the wire
        self._expect = (d.num_layers, d.num_kv_heads, d.head_dim, d.dtype)

    # ---- gRPC handler (server threads) ---------------------------------------------------
    def Decode(self, request, context):  # noqa: N802
        try:
            req = worker_request(request.request, self.limits, decode=True)
            kv_source(request.source, req, self.limits)
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.peers is not None and not self.peers.allows(request.source.address):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"source.address={request.source.address!r} is not a "
                          f"registered prefill worker (the router lists {self.worker_id} no such address)")
        rid, outbox = req.request_id, Outbox()
        try:
            self.post(lambda: self._admit(req, request.source, outbox),
                      on_error=lambda e: outbox.put(ErrorEvent(grpc.StatusCode.INTERNAL, f"admitting the request failed: {e!r}")))
        except EngineDead as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        context.add_callback(lambda: self._post_quietly(lambda: self._abort(rid)))
        for ev in outbox:
            if isinstance(ev, TokenEvent):
                yield wpb.DecodeResponse(token_ids=ev.token_ids, migration=ev.migration)
            elif isinstance(ev, FinishEvent):
                yield wpb.DecodeResponse(finish_reason=FINISH_TO_PROTO[ev.reason])
            else:
                context.abort(ev.code, ev.message)

    # ---- engine thread: admission and pulls ----------------------------------------------
    def _admit(self, req: Request, source: wpb.KVSource, outbox: Outbox) -> None:
        rid, d = req.request_id, source.kv
        problem = None
        if rid in self._entries:
            problem = (grpc.StatusCode.ALREADY_EXISTS, f"request_id={rid!r} is already on {self.worker_id}")
        elif (d.num_layers, d.num_kv_heads, d.head_dim, d.dtype) != self._expect:
            problem = (grpc.StatusCode.FAILED_PRECONDITION, f"KV from {source.worker_id} is (layers, kv_heads, head_dim, dtype)="
                       f"{(d.num_layers, d.num_kv_heads, d.head_dim, d.dtype)}, {self.worker_id} runs {self._expect}")
        else:
            need = blocks_for(req.peak_tokens, self.inst.blocks.block_size)
            if need > self.inst.blocks.capacity_blocks:
                problem = (grpc.StatusCode.INVALID_ARGUMENT, f"prompt_len={req.prompt_len} + max_tokens={req.sampling.max_tokens} "
                           f"needs {need} KV blocks, decode worker {self.worker_id} has {self.inst.blocks.capacity_blocks}")
        if problem:
            outbox.put(ErrorEvent(*problem))
            return
        if source.lease_ms > 0:  # renew well within the shortest lease seen (at most 10 times a second)
            self.renew_every_s = max(0.1, min(self.renew_every_s, source.lease_ms / 3000))
        req.status = Status.MIGRATING
        self._entries[rid] = _Entry(req, source, outbox, time.perf_counter(), sent=len(req.output_token_ids))
        self._queue.append(rid)

    def _start_pulls(self) -> None:
        """FCFS: pull the oldest queued request while the instance has room for it."""
        while self._queue:
            e = self._entries[self._queue[0]]
            if not self.inst.can_pull(e.request):
                return
            self._queue.popleft()
            self.inst.blocks.allocate(e.request.request_id, e.request.num_tokens - 1)  # decode writes the last token's KV
            e.state, e.pull_start = "pulling", time.perf_counter()
            self._pool.submit(self._pull, e)

    def _pull(self, e: _Entry) -> None:
        """Pull thread: stream the KV into host memory, then hand it to the engine thread."""
        rid = e.request.request_id
        try:
            stub = worker_pb2_grpc.PrefillWorkerStub(self.channels.get(e.source.address))
            call = stub.PullKV(wpb.PullKVRequest(request_id=rid, max_chunk_bytes=self.chunk_bytes), timeout=self.pull_timeout_s)
            e.call = call
            if e.cancelled:
                call.cancel()
            asm, chunks = KVAssembler(descriptor_from_proto(e.source.kv)), 0
            for chunk in call:
                asm.add(chunk)
                chunks += 1
            k, v = asm.arrays(block_size=self.inst.blocks.block_size)
            pulled = time.perf_counter()
            self._post_quietly(lambda: self._land(e, k, v, asm.bytes, chunks, pulled))
        except grpc.RpcError as err:
            why = f"{err.code().name}: {err.details()}"
            self._post_quietly(lambda: self._pull_failed(e, why))
        except ValueError as err:  # malformed, incomplete or corrupted chunks
            why, corrupted = f"bad KV stream: {err}", isinstance(err, ChecksumMismatch)
            self._post_quietly(lambda: self._pull_failed(e, why, corrupted))

    def _land(self, e: _Entry, k, v, wire_bytes: int, chunks: int, pulled: float) -> None:
        rid = e.request.request_id
        if self._entries.get(rid) is not e or e.state != "pulling":
            return  # aborted while in flight: its blocks are already free
        # Counted as the runner lands them (wire_bytes too on devices; an emulated device's payload
        # is a placeholder of the real model's bytes, dsjax/runtime/emulated.py).
        nbytes = self.inst.runner.import_kv(self.inst.blocks.block_table(rid), k, v)
        now = time.perf_counter()
        self._release_source(e)
        e.state, e.call = "running", None
        e.request.status = Status.RUNNING
        self.inst.running.append(e.request)
        self.inst.migrations += 1
        self.inst.bytes_pulled += nbytes
        migration = wpb.Migration(bytes=nbytes, chunks=chunks, wait_seconds=e.pull_start - e.arrival,
                                  pull_seconds=pulled - e.pull_start, insert_seconds=now - pulled)
        e.outbox.put(TokenEvent((), migration=migration))

    def _pull_failed(self, e: _Entry, why: str, corrupted: bool = False) -> None:
        rid = e.request.request_id
        self.checksum_failures += corrupted
        if self._entries.get(rid) is not e:
            return
        self._drop(e)
        e.outbox.put(ErrorEvent(grpc.StatusCode.ABORTED, f"KV pull from {e.source.worker_id} failed ({why}); recompute"))

    def _release_source(self, e: _Entry) -> None:
        """Tell the prefill worker to free its copy (fire and forget: its lease covers a loss)."""
        stub = worker_pb2_grpc.PrefillWorkerStub(self.channels.get(e.source.address))
        fut = stub.ReleaseKV.future(wpb.LeaseRequest(request_ids=[e.request.request_id]), timeout=10.0)
        fut.add_done_callback(lambda f: f.exception() and log.info("release on %s failed: %s", e.source.worker_id, f.exception()))

    def _drop(self, e: _Entry) -> None:
        """Forget a request and free its blocks here; release the source copy if not yet done."""
        rid = e.request.request_id
        self._entries.pop(rid, None)
        if e.state == "queued":
            self._queue.remove(rid)
        if e.state == "pulling":
            e.cancelled = True
            if e.call is not None:
                e.call.cancel()
        if e.state in ("queued", "pulling"):
            self._release_source(e)
        if e.request in self.inst.running:
            self.inst.running.remove(e.request)
        self.inst.blocks.free(rid)

    def _abort(self, rid: str) -> None:
        e = self._entries.get(rid)
        if e is not None:
            self._drop(e)
            e.outbox.put(FinishEvent(FinishReason.CANCELLED))

    # ---- engine thread: the loop ---------------------------------------------------------
    def tick(self) -> None:
        self._start_pulls()
        if self._queue and time.monotonic() - self._last_renew >= self.renew_every_s:
            self._renew_leases()

    def _renew_leases(self) -> None:
        self._last_renew = time.monotonic()
        by_source: dict[str, list[_Entry]] = {}
        for rid in self._queue:
            e = self._entries[rid]
            by_source.setdefault(e.source.address, []).append(e)
        for address, entries in by_source.items():
            stub = worker_pb2_grpc.PrefillWorkerStub(self.channels.get(address))
            fut = stub.RenewLease.future(wpb.LeaseRequest(request_ids=[e.request.request_id for e in entries]), timeout=5.0)
            fut.add_done_callback(lambda f, entries=entries: self._renewed(f, entries))

    def _renewed(self, fut, entries: list[_Entry]) -> None:
        """gRPC thread: leases the source no longer holds mean the KV is gone."""
        if fut.exception() is not None:
            return  # the source may be restarting; a pull will tell
        unknown = set(fut.result().unknown_ids)
        for e in entries:
            if e.request.request_id in unknown:
                self._post_quietly(lambda e=e: self._lease_lost(e))

    def _lease_lost(self, e: _Entry) -> None:
        if e.state == "queued":
            self._pull_failed(e, "lease no longer held")

    def busy(self) -> bool:
        return self.inst.busy()

    def step(self) -> bool:
        finished, preempted = self.inst.step()
        done = {id(r) for r in finished}
        for rid, e in list(self._entries.items()):
            if e.state != "running":
                continue
            out = e.request.output_token_ids
            if len(out) > e.sent:
                e.outbox.put(TokenEvent(tuple(out[e.sent :])))
                e.sent = len(out)
            if id(e.request) in done:
                del self._entries[rid]
                e.outbox.put(FinishEvent(e.request.finish_reason))
        for r in preempted:  # blocks already freed by the scheduler
            e = self._entries.pop(r.request_id)
            e.outbox.put(ErrorEvent(grpc.StatusCode.ABORTED, f"preempted on {self.worker_id} (out of KV blocks); recompute"))
        return True

    def fail_all(self, error: BaseException) -> None:
        for e in self._entries.values():
            e.outbox.put(ErrorEvent(grpc.StatusCode.INTERNAL, f"decode engine failed: {error!r}"))
        self._entries.clear()

    def stats(self, timeout: float = 10.0) -> wpb.InstanceStats:
        def collect():
            b, r = self.inst.blocks, self.inst.runner
            return wpb.InstanceStats(
                worker_id=self.worker_id, role=wpb.DECODE, pid=os.getpid(), tp=len(r.devices()) // r.pp, pp=r.pp,
                num_blocks=b.capacity_blocks, free_blocks=b.num_free_blocks, waiting=len(self._queue),
                running=len(self.inst.running), pulling=sum(e.state == "pulling" for e in self._entries.values()),
                migrations=self.inst.migrations, kv_bytes=self.inst.bytes_pulled, alive=True,
                kv_checksum_failures=self.checksum_failures, **host_time_fields(r),
            )

        return self.call(collect, timeout=timeout)

    def warmup(self, prompt_len: int = 8, steps: int = 3) -> None:
        """Compile the KV insert and the decode program for a batch of one."""
        def run():
            req = Request(request_id="warmup", prompt_token_ids=[1] * prompt_len, output_token_ids=[1], seed=0,
                          sampling=SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
            table = self.inst.blocks.allocate("warmup", prompt_len)
            r, bs = self.inst.runner, self.inst.blocks.block_size
            d = r.kv_descriptor(prompt_len)
            zeros = np.zeros((d.num_layers, len(table), d.num_kv_heads, bs, d.head_dim), np.dtype(d.dtype))
            r.import_kv(table, zeros, zeros)
            self.inst.running.append(req)
            while self.inst.running:
                self.inst.step()
            self.inst.blocks.free("warmup")

        self.call(run, timeout=None)
