"""The router's side of disaggregated serving across processes: prefill and decode workers
reached over gRPC (serving/prefill_worker.py, serving/decode_worker.py).

One request, as seen from the router (each step on the handler thread of its Generate call):

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

import logging
import threading
import time

import grpc

from dsjax.engine.request import FinishReason
from serving.backend import GenerateJob
from serving.engine_loop import ErrorEvent, Event, FinishEvent, TokenEvent
from serving.messages import FINISH_FROM_PROTO, worker_request
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.registry import Registry, WorkerEntry

log = logging.getLogger(__name__)


class _Retry(Exception):
    """The KV is lost but the request can be recomputed from the tokens streamed so far."""


class _Stop(Exception):
    """The request ends with `event` (an error, or CANCELLED)."""

    def __init__(self, event: Event):
        super().__init__(event)
        self.event = event


class _RemoteHandle:
    def __init__(self, backend: "RemoteBackend", job: GenerateJob):
        self.backend = backend
        self.registry = backend.registry
        self.job = job
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._call = None
        self._held: tuple[WorkerEntry, str] | None = None  # (prefill worker, worker request id): KV under lease
        self.breakdown: dict = {"recomputes": 0}

    # ---- any thread ----------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            call, held, self._held = self._call, self._held, None
        if call is not None:
            call.cancel()
        if held is not None:
            _release(*held)

    # ---- the Generate handler's thread ---------------------------------------------------
    def events(self):
        job, output = self.job, []
        for attempt in range(self.backend.max_recomputes + 1):
            wid = f"{job.request_id}#{attempt}"
            done = _finished(job, output)  # the lost worker had sent the last token, not the finish
            if done is not None:
                yield FinishEvent(done, self.breakdown)
                return
            try:
                pw, resp = self._prefill(worker_request(wid, job.prompt_token_ids, output, job.sampling, job.seed, job.eos_token_ids))
                output.append(resp.token_id)
                yield TokenEvent((resp.token_id,))
                if resp.finish_reason:
                    yield FinishEvent(FINISH_FROM_PROTO[resp.finish_reason], self.breakdown)
                    return
                req = worker_request(wid, job.prompt_token_ids, output, job.sampling, job.seed, job.eos_token_ids)
                for ids in self._decode(req, pw, resp):
                    output.extend(ids)
                    yield TokenEvent(ids)
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

    def _prefill(self, req: wpb.WorkerRequest) -> tuple[WorkerEntry, wpb.PrefillResponse]:
        pw = self._acquire(wpb.PREFILL)
        try:
            resp = self._result(pw, pw.prefill.Prefill.future(wpb.PrefillRequest(request=req),
                                                              timeout=self.backend.call_timeout_s))
        except _Stop:
            # Cancelled (or failed) with the worker alive: the prefill may have completed just as
            # the call ended, leaving KV under a lease that nobody would pull. Release it now.
            _release(pw, req.request_id)
            raise
        finally:
            self.registry.release(pw)
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

    def _decode(self, req: wpb.WorkerRequest, pw: WorkerEntry, resp: wpb.PrefillResponse):
        """Yields token id tuples; returns after the FinishEvent's data is recorded."""
        dw = self._acquire(wpb.DECODE)
        source = wpb.KVSource(worker_id=pw.id, address=pw.address, kv=resp.kv, lease_ms=resp.lease_ms)
        timeout = self.backend.call_timeout_s + self.backend.per_token_timeout_s * self.job.sampling.max_tokens
        call = self._track(dw, dw.decode.Decode(wpb.DecodeRequest(request=req, source=source), timeout=timeout))
        bd, landed = self.breakdown, None
        try:
            for msg in call:
                if msg.HasField("migration"):
                    m = msg.migration
                    bd["kv_bytes"] = bd.get("kv_bytes", 0) + m.bytes
                    bd["transfer_s"] = bd.get("transfer_s", 0.0) + m.wait_seconds + m.pull_seconds + m.insert_seconds
                    landed = time.perf_counter()
                    with self._lock:
                        self._held = None  # landed: the decode worker released the prefill copy
                if msg.token_ids:
                    yield tuple(msg.token_ids)
                if msg.finish_reason:
                    if landed is not None:
                        bd["decode_s"] = bd.get("decode_s", 0.0) + time.perf_counter() - landed
                    raise _Stop(FinishEvent(FINISH_FROM_PROTO[msg.finish_reason], bd))
            raise _Stop(ErrorEvent(grpc.StatusCode.INTERNAL, f"decode worker {dw.id} ended the stream without a finish"))
        except grpc.RpcError as err:
            with self._lock:
                held, self._held = self._held, None
            if held is not None:
                _release(*held)
            if err.code() == grpc.StatusCode.ABORTED and not self._cancelled.is_set():
                raise _Retry(err.details()) from None
            raise self._classify(dw, err.code(), err.details(), retry=True) from None
        finally:
            self._untrack(dw, call)
            self.registry.release(dw)

    # ---- helpers -------------------------------------------------------------------------
    def _acquire(self, role: int) -> WorkerEntry:
        if self._cancelled.is_set():
            raise _Stop(FinishEvent(FinishReason.CANCELLED, self.breakdown))
        w = self.registry.acquire(role)
        # None registered: wait a little for one (a restarted router hears from its workers within
        # a heartbeat, and requests that reach it first should not fail for that), then give up.
        end = time.monotonic() + self.backend.worker_wait_s
        while w is None and time.monotonic() < end and not self._cancelled.is_set():
            if self.registry.wait_for(role, 1, min(0.1, end - time.monotonic())):
                w = self.registry.acquire(role)
        if self._cancelled.is_set():
            if w is not None:
                self.registry.release(w)
            raise _Stop(FinishEvent(FinishReason.CANCELLED, self.breakdown))
        if w is None:
            with self._lock:
                held, self._held = self._held, None
            if held is not None:
                _release(*held)
            raise _Stop(ErrorEvent(grpc.StatusCode.UNAVAILABLE, f"no {wpb.Role.Name(role).lower()} worker is available"))
        return w

    def _track(self, w: WorkerEntry, call):
        """Remember `call` so a client cancel, or the registry dropping `w`, cancels it."""
        with self._lock:
            self._call = call
        if self._cancelled.is_set() or not self.registry.track(w, call):
            call.cancel()
        return call

    def _untrack(self, w: WorkerEntry, call) -> None:
        self.registry.untrack(w, call)
        with self._lock:
            self._call = None

    def _result(self, w: WorkerEntry, fut):
        self._track(w, fut)
        try:
            return fut.result()
        except grpc.RpcError as err:
            raise self._classify(w, err.code(), err.details(), retry=True) from None
        except grpc.FutureCancelledError:
            raise self._classify(w, grpc.StatusCode.CANCELLED, "cancelled", retry=True) from None
        finally:
            self._untrack(w, fut)

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


class RemoteBackend:
    def __init__(self, registry: Registry, *, max_recomputes: int = 2, call_timeout_s: float = 300.0,
                 per_token_timeout_s: float = 1.0, worker_wait_s: float = 2.0):
        """`worker_wait_s`: how long a request waits for a worker of a phase none of which is
        registered (a router just restarted: its workers register within a heartbeat) before it
        ends with UNAVAILABLE."""
        self.registry = registry
        self.worker_wait_s = worker_wait_s
        self.max_recomputes = max_recomputes
        self.call_timeout_s = call_timeout_s
        self.per_token_timeout_s = per_token_timeout_s

    def submit(self, job: GenerateJob) -> _RemoteHandle:
        return _RemoteHandle(self, job)

    def ready(self) -> bool:
        return self.registry.has(wpb.PREFILL) and self.registry.has(wpb.DECODE)

    def instances(self) -> list[wpb.InstanceStats]:
        return self.registry.instances()

    def close(self) -> None:
        self.registry.close()
