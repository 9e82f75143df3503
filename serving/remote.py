"""The router's side of serving across processes: prefill and decode workers reached over gRPC
(serving/prefill_worker.py, serving/decode_worker.py), or colocated / chunked replica workers
(serving/replica_worker.py: `Generate` on the replica with the least KV load, tokens streamed).

One request, as seen from the router (a task on the backend's event loop; its events go to the
request's outbox, which the front reads):

    prefill worker := least loaded;  Prefill(prompt + tokens so far)  -> next token, KV lease
    decode worker  := least loaded;  Decode(request, KV source)       -> token stream
                                     (the decode worker pulls the KV from the prefill worker)

Fail-or-recompute: the router owns the request's tokens, so when the KV is lost before the
request finishes (prefill worker died or hung, lease expired, KV preempted on decode: the decode
worker answers ABORTED; or the decode worker itself died or was quarantined by the watchdog), the
request is prefilled again from prompt + tokens streamed so far, as one new prompt, on the
workers left, up to `max_recomputes` times. The client's stream just continues: every token it
got is in that prompt, and the next one comes from the new prefill. Only when no worker of a
phase is left (and none registers within `worker_wait_s`) does the request end with UNAVAILABLE.
Every call to a worker has a deadline (`call_timeout_s`, plus `per_token_timeout_s` per token
for a Decode stream). Cancelling a request cancels the call in flight and releases the KV on the
prefill worker (idempotent; the lease is the backstop).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

import grpc

from dsjax.engine.request import FinishReason
from serving.backend import GenerateJob
from serving.engine_loop import ErrorEvent, Event, FinishEvent, Outbox, TokenEvent
from serving.messages import FINISH_FROM_PROTO, worker_request
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.registry import BUSY, Registry, WorkerEntry

log = logging.getLogger(__name__)


class _Retry(Exception):
    """The KV is lost but the request can be recomputed from the tokens streamed so far."""


class _Stop(Exception):
    """The request ends with `event` (an error, or CANCELLED)."""

    def __init__(self, event: Event):
        super().__init__(event)
        self.event = event


class _RemoteHandle:
    """One request's calls to the workers, run as a task on the backend's event loop; its events go
    to `outbox`, as an in-process engine's do, so the fronts read both kinds of handle alike."""

    def __init__(self, backend: "RemoteBackend", job: GenerateJob):
        self.backend = backend
        self.registry = backend.registry
        self.job = job
        self.outbox = Outbox()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._call = None  # the aio call in flight (cancelled on the loop's thread)
        self._tracked: _OnLoop | None = None  # that call as the registry tracks it
        self._held: tuple[WorkerEntry, str] | None = None  # (prefill worker, worker request id): KV under lease
        self.breakdown: dict = {"recomputes": 0}

    # ---- any thread ----------------------------------------------------------------------
    def events(self):
        """Blocking: the events in order (the fronts read `outbox` on their event loops instead)."""
        return iter(self.outbox)

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            call, held, self._held = self._call, self._held, None
        if call is not None:
            self.backend.on_loop(call.cancel)
        if held is not None:
            _release(*held)

    # ---- the backend's event loop ----------------------------------------------------------
    async def run(self) -> None:
        try:
            async for event in self._events():
                self.outbox.put(event)
        except asyncio.CancelledError:  # the backend is closing
            self.outbox.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, "the router is shutting down"))
            raise
        except Exception as e:  # never leave a reader waiting
            log.exception("request %s failed", self.job.request_id)
            self.outbox.put(ErrorEvent(grpc.StatusCode.INTERNAL, f"internal error: {e!r}"))

    async def _events(self):
        job, output = self.job, []
        for attempt in range(self.backend.max_recomputes + 1):
            wid = f"{job.request_id}#{attempt}"
            done = _finished(job, output)  # the lost worker had sent the last token, not the finish
            if done is not None:
                yield FinishEvent(done, self.breakdown)
                return
            try:
                req = worker_request(wid, job.prompt_token_ids, output, job.sampling, job.seed, job.eos_token_ids)
                if self.backend.replicas:
                    stream = self._replica(req)
                else:
                    pw, resp = await self._prefill(req)
                    output.append(resp.token_id)
                    yield TokenEvent((resp.token_id,))
                    if resp.finish_reason:
                        yield FinishEvent(FINISH_FROM_PROTO[resp.finish_reason], self.breakdown)
                        return
                    req = worker_request(wid, job.prompt_token_ids, output, job.sampling, job.seed, job.eos_token_ids)
                    stream = self._decode(req, pw, resp)
                async for event in stream:
                    output.extend(event.token_ids)
                    yield event
                return
            except _Retry as e:
                self.breakdown["recomputes"] += 1
                lost = e
                log.warning("%s: %s; recomputing from %d tokens", job.request_id, e, len(output))
            except _Stop as e:
                yield e.event
                return
        yield ErrorEvent(grpc.StatusCode.UNAVAILABLE, f"the KV of {job.request_id} was lost {self.breakdown['recomputes']} "
                                                      f"times (--max-recomputes {self.backend.max_recomputes}); last: {lost}")

    async def _prefill(self, req: wpb.WorkerRequest) -> tuple[WorkerEntry, wpb.PrefillResponse]:
        tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
        pw = await self._acquire(wpb.PREFILL, tokens)
        try:
            stub = worker_pb2_grpc.PrefillWorkerStub(self.backend.channel(pw))
            call = stub.Prefill(wpb.PrefillRequest(request=req), timeout=self.backend.call_timeout_s,
                                metadata=self.registry.channels.metadata)
            self._track(pw, call)
            try:
                resp = await call
            except (grpc.RpcError, asyncio.CancelledError) as err:
                raise self._failed(pw, err) from None
            finally:
                self._untrack(pw)
        except _Stop:
            # Cancelled (or failed) with the worker alive: the prefill may have completed just as
            # the call ended, leaving KV under a lease that nobody would pull. Release it now.
            _release(pw, req.request_id)
            raise
        finally:
            self.backend.release_slot(pw, tokens)
        bd = self.breakdown
        bd["queue_s"] = bd.get("queue_s", 0.0) + resp.queue_seconds
        bd["prefill_s"] = bd.get("prefill_s", 0.0) + resp.prefill_seconds
        if not resp.finish_reason:
            with self._lock:
                self._held = (pw, req.request_id)
            if self._cancelled.is_set():  # cancelled while the reply was on its way
                self.cancel()
                raise _Stop(FinishEvent(FinishReason.CANCELLED, bd))
        return pw, resp

    async def _decode(self, req: wpb.WorkerRequest, pw: WorkerEntry, resp: wpb.PrefillResponse):
        """Yields TokenEvents; ends by raising _Stop with the finish (or _Retry)."""
        peak = len(req.prompt_token_ids) + self.job.sampling.max_tokens
        dw = await self._acquire(wpb.DECODE, peak)
        source = wpb.KVSource(worker_id=pw.id, address=pw.address, kv=resp.kv, lease_ms=resp.lease_ms)
        timeout = self.backend.call_timeout_s + self.backend.per_token_timeout_s * self.job.sampling.max_tokens
        stub = worker_pb2_grpc.DecodeWorkerStub(self.backend.channel(dw))
        call = stub.Decode(wpb.DecodeRequest(request=req, source=source), timeout=timeout,
                           metadata=self.registry.channels.metadata)
        self._track(dw, call)
        bd, landed = self.breakdown, None
        try:
            async for msg in call:
                if msg.HasField("migration"):
                    m = msg.migration
                    bd["kv_bytes"] = bd.get("kv_bytes", 0) + m.bytes
                    bd["transfer_s"] = bd.get("transfer_s", 0.0) + m.wait_seconds + m.pull_seconds + m.insert_seconds
                    landed = time.perf_counter()
                    with self._lock:
                        self._held = None  # landed: the decode worker released the prefill copy
                if msg.token_ids:
                    yield TokenEvent(tuple(msg.token_ids))
                if msg.finish_reason:
                    if landed is not None:
                        bd["decode_s"] = bd.get("decode_s", 0.0) + time.perf_counter() - landed
                    raise _Stop(FinishEvent(FINISH_FROM_PROTO[msg.finish_reason], bd))
            raise _Stop(ErrorEvent(grpc.StatusCode.INTERNAL, f"decode worker {dw.id} ended the stream without a finish"))
        except (grpc.RpcError, asyncio.CancelledError) as err:
            with self._lock:
                held, self._held = self._held, None
            if held is not None:
                _release(*held)
            if isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.ABORTED and not self._cancelled.is_set():
                raise _Retry(err.details()) from None
            raise self._failed(dw, err) from None
        finally:
            self._untrack(dw)
            self.registry.release(dw, peak)

    async def _replica(self, req: wpb.WorkerRequest):
        """Both phases on one replica worker. Yields TokenEvents; ends by raising _Stop with the
        finish, or _Retry when the replica is gone (the next attempt goes to another)."""
        peak = len(req.prompt_token_ids) + self.job.sampling.max_tokens
        w = await self._acquire(wpb.COLOCATED, peak)
        timeout = self.backend.call_timeout_s + self.backend.per_token_timeout_s * self.job.sampling.max_tokens
        call = worker_pb2_grpc.ReplicaWorkerStub(self.backend.channel(w)).Generate(
            wpb.ReplicaRequest(request=req), timeout=timeout, metadata=self.registry.channels.metadata)
        self._track(w, call)
        bd, first = self.breakdown, None
        try:
            async for msg in call:
                if msg.token_ids:
                    if first is None:
                        first = time.perf_counter()
                        bd["queue_s"] = bd.get("queue_s", 0.0) + msg.queue_seconds
                        bd["prefill_s"] = bd.get("prefill_s", 0.0) + msg.prefill_seconds
                    yield TokenEvent(tuple(msg.token_ids))
                if msg.finish_reason:
                    bd["recomputes"] += msg.recomputes
                    if first is not None:
                        bd["decode_s"] = bd.get("decode_s", 0.0) + time.perf_counter() - first
                    raise _Stop(FinishEvent(FINISH_FROM_PROTO[msg.finish_reason], bd))
            raise _Stop(ErrorEvent(grpc.StatusCode.INTERNAL, f"replica worker {w.id} ended the stream without a finish"))
        except (grpc.RpcError, asyncio.CancelledError) as err:
            raise self._failed(w, err) from None
        finally:
            self._untrack(w)
            self.registry.release(w, peak)

    # ---- helpers -------------------------------------------------------------------------
    async def _acquire(self, role: int, tokens: int) -> WorkerEntry:
        if self._cancelled.is_set():
            raise _Stop(FinishEvent(FinishReason.CANCELLED, self.breakdown))
        w = await self.backend.slot(role, tokens) if role == wpb.PREFILL else self.registry.acquire(role, tokens)
        # None registered: wait a little for one (a restarted router hears from its workers within
        # a heartbeat, and requests that reach it first should not fail for that), then give up.
        end = time.monotonic() + self.backend.worker_wait_s
        while w is None and time.monotonic() < end and not self._cancelled.is_set():
            await asyncio.sleep(min(0.05, max(0.0, end - time.monotonic())))
            w = self.registry.acquire(role, tokens)
        if self._cancelled.is_set():
            if w is not None:
                if role == wpb.PREFILL:
                    self.backend.release_slot(w, tokens)
                else:
                    self.registry.release(w, tokens)
            raise _Stop(FinishEvent(FinishReason.CANCELLED, self.breakdown))
        if w is None:
            with self._lock:
                held, self._held = self._held, None
            if held is not None:
                _release(*held)
            raise _Stop(ErrorEvent(grpc.StatusCode.UNAVAILABLE, f"no {wpb.Role.Name(role).lower()} worker is available"))
        return w

    def _track(self, w: WorkerEntry, call) -> None:
        """Remember `call` so a client cancel, or the registry dropping `w` (from its own threads),
        cancels it."""
        tracked = _OnLoop(self.backend, call)
        with self._lock:
            self._call = call
        self._tracked = tracked
        if self._cancelled.is_set() or not self.registry.track(w, tracked):
            call.cancel()

    def _untrack(self, w: WorkerEntry) -> None:
        self.registry.untrack(w, self._tracked)
        with self._lock:
            self._call = None

    def _failed(self, w: WorkerEntry, err: BaseException) -> Exception:
        if isinstance(err, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise err  # the task itself is cancelled (the backend is closing), not the call
            return self._classify(w, grpc.StatusCode.CANCELLED, "cancelled", retry=True)
        return self._classify(w, err.code(), err.details(), retry=True)

    def _classify(self, w: WorkerEntry, code: grpc.StatusCode, details: str, retry: bool) -> Exception:
        """A failed call: the client cancelled; or the worker is gone (died: UNAVAILABLE; hung
        and dropped, or quarantined, by the registry: CANCELLED), retried if `retry` else
        UNAVAILABLE; or an error to pass on as it is (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...)."""
        if self._cancelled.is_set():
            return _Stop(FinishEvent(FinishReason.CANCELLED, self.breakdown))
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return _Stop(ErrorEvent(code, f"{wpb.Role.Name(w.info.role).lower()} worker {w.id} did not finish the "
                                          f"request within its deadline: {details}"))
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            if not w.hung:  # a quarantined worker stays registered: it rejoins once it progresses
                self.registry.drop(w.id, f"{code.name}: {details}", w)
            why = f"{wpb.Role.Name(w.info.role).lower()} worker {w.id} at {w.address} failed: {code.name}: {details}"
            return _Retry(why) if retry else _Stop(ErrorEvent(grpc.StatusCode.UNAVAILABLE, why))
        return _Stop(ErrorEvent(code, details))


class _OnLoop:
    """An aio call as the registry tracks it: `cancel()` from any thread runs on the call's loop."""

    def __init__(self, backend: "RemoteBackend", call):
        self._backend, self._call = backend, call

    def cancel(self) -> None:
        self._backend.on_loop(self._call.cancel)


def _finished(job: GenerateJob, output: list[int]) -> FinishReason | None:
    """Whether the tokens so far already end the request (as the engine's `append_token` decides)."""
    if not output:
        return None
    sp, last = job.sampling, output[-1]
    if last in sp.stop_token_ids:
        return FinishReason.STOP
    if not sp.ignore_eos and last in job.eos_token_ids:
        return FinishReason.EOS
    return FinishReason.LENGTH if len(output) >= sp.max_tokens else None


def _release(w: WorkerEntry, wid: str) -> None:
    """Free a request's KV on its prefill worker (fire and forget)."""
    fut = w.prefill.ReleaseKV.future(wpb.LeaseRequest(request_ids=[wid]), timeout=5.0)
    fut.add_done_callback(lambda f: f.exception() and log.info("release of %s on %s failed: %s", wid, w.id, f.exception()))


# Prefill calls one prefill worker holds at once (its prefill queue, ~4 batches of 16 prompts);
# more wait in the router. Each call holds one of the worker's gRPC threads until its prefill is
# done, and when decode falls behind, the prefill pool fills and calls pile up there: OPT-66B
# ShareGPT at 17 req/s filled all 256 threads, lease renewals found none and timed out, and
# thousands of KV leases expired, their requests prefilled again (docs/results.md, "Session 12").
MAX_PREFILL_INFLIGHT = 64


class RemoteBackend:
    """Requests on the workers: each a task on one event loop of the backend's own thread (one
    hand-off per message to a front's loop, no thread per open stream)."""

    def __init__(self, registry: Registry, *, max_recomputes: int = 2, call_timeout_s: float = 300.0,
                 per_token_timeout_s: float = 1.0, worker_wait_s: float = 2.0, replicas: bool = False,
                 max_prefill_inflight: int = MAX_PREFILL_INFLIGHT):
        """`worker_wait_s`: how long a request waits for a worker of a phase none of which is
        registered (a router just restarted: its workers register within a heartbeat) before it
        ends with UNAVAILABLE. `replicas`: serve on colocated / chunked replica workers instead of
        prefill and decode workers. `max_prefill_inflight`: Prefill calls a prefill worker holds
        at once; more wait in the router, first come first served (`slot`)."""
        if max_prefill_inflight < 1:
            raise ValueError(f"max_prefill_inflight={max_prefill_inflight} must be >= 1")
        self.registry = registry
        self.max_prefill_inflight = max_prefill_inflight
        self._slot_waiters: collections.deque[tuple[asyncio.Future, int, int]] = collections.deque()
        self.replicas = replicas
        self.worker_wait_s = worker_wait_s
        self.max_recomputes = max_recomputes
        self.call_timeout_s = call_timeout_s
        self.per_token_timeout_s = per_token_timeout_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="remote-backend", daemon=True)
        self._thread.start()

    async def slot(self, role: int, tokens: int) -> WorkerEntry | None:
        """(On the loop.) The least-loaded worker of `role` with fewer than `max_prefill_inflight`
        calls in flight, counted on it; while every live one is full the caller waits here, in
        arrival order, behind any earlier waiter; None when no worker of the role is registered."""
        if not self._slot_waiters:
            w = self.registry.acquire(role, tokens, self.max_prefill_inflight)
            if w is not BUSY:
                return w
        fut = self.loop.create_future()
        self._slot_waiters.append((fut, role, tokens))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result() is not None:
                self.release_slot(fut.result(), tokens)  # handed a slot it will not use: pass it on
            raise

    def release_slot(self, w: WorkerEntry, tokens: int) -> None:
        """(On the loop.) The end of a prefill call `slot` gave: release it and wake the waiters."""
        self.registry.release(w, tokens)
        self.slot_freed()

    def slot_freed(self) -> None:
        """(On the loop.) A prefill call ended: hand each free slot to the first waiter, acquired on
        its behalf so no later arrival takes it first (a worker that joins meanwhile is filled at
        the next release)."""
        while self._slot_waiters:
            fut, role, tokens = self._slot_waiters[0]
            if fut.done():  # cancelled while waiting
                self._slot_waiters.popleft()
                continue
            w = self.registry.acquire(role, tokens, self.max_prefill_inflight)
            if w is BUSY:
                return
            self._slot_waiters.popleft()
            fut.set_result(w)

    def channel(self, w: WorkerEntry):
        """The aio channel to `w` on this backend's loop (on the loop's thread)."""
        return self.registry.channels.aio(w.address, self.loop)

    def on_loop(self, fn) -> None:
        """Run `fn()` on the loop's thread (now, when called there)."""
        if threading.current_thread() is self._thread:
            fn()
        elif not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(fn)
            except RuntimeError:  # closed meanwhile
                pass

    def submit(self, job: GenerateJob) -> _RemoteHandle:
        handle = _RemoteHandle(self, job)
        asyncio.run_coroutine_threadsafe(handle.run(), self.loop)
        return handle

    def ready(self) -> bool:
        if self.replicas:
            return self.registry.has(wpb.COLOCATED)
        return self.registry.has(wpb.PREFILL) and self.registry.has(wpb.DECODE)

    def instances(self) -> list[wpb.InstanceStats]:
        return self.registry.instances()

    def close(self) -> None:
        self.registry.close()

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(5.0)
            except Exception:  # a task that would not end: the daemon thread goes with the process
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5.0)
