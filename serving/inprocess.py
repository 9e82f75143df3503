"""All phases in this process: one engine from `dsjax.runtime.builder.build_engine`, KV moved between
meshes by device_put (no gRPC between phases).

- `InProcessBackend`: a colocated or chunked engine (or replicas of it) driven by one engine
  thread (serving/engine_loop.py). After every step the loop diffs each active request's output
  tokens against what it has sent and posts the new ones to the request's outbox.
- `ThreadedBackend`: a disaggregated engine run by `dsjax.engine.threaded.ThreadedDisaggEngine`, one
  thread per instance, so decode steps do not wait behind prefills; its `on_update` callback
  (on the instance thread, outside the engine's lock, once per batch) posts the new tokens.

Handlers never read engine state: they read their outbox.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import grpc

from dsjax.engine.colocated import ColocatedEngine, ReplicatedEngine
from dsjax.engine.disaggregated import DisaggEngine
from dsjax.engine.request import FinishReason, Request, Status
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.threaded import ThreadedDisaggEngine
from serving.backend import GenerateJob
from serving.engine_loop import EngineDead, EngineLoop, ErrorEvent, FinishEvent, Outbox, TokenEvent
from serving.messages import host_time_fields
from serving.proto.dsjax.v1 import worker_pb2 as wpb


@dataclasses.dataclass
class _Active:
    request: Request
    outbox: Outbox
    sent: int = 0


class _Handle:
    def __init__(self, backend: "InProcessBackend", request_id: str, outbox: Outbox):
        self._backend, self._id, self._outbox = backend, request_id, outbox
        self.outbox = outbox  # for readers in an event loop (Handle.outbox)

    def events(self):
        return iter(self._outbox)

    def cancel(self) -> None:
        if not self._outbox.closed:
            try:
                self._backend.post(lambda: self._backend._abort(self._id))
            except EngineDead:
                pass


class InProcessBackend(EngineLoop):
    def __init__(self, engine: ColocatedEngine | ReplicatedEngine | DisaggEngine):
        super().__init__("dsjax-engine")
        self.engine = engine
        self.warm = False  # set once warmed up (or when warm-up is skipped): health turns SERVING
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}  # from submit on, so a dying loop can end every stream

    # ---- Backend -------------------------------------------------------------------------
    def submit(self, job: GenerateJob) -> _Handle:
        req = Request(request_id=job.request_id, prompt_token_ids=list(job.prompt_token_ids), sampling=job.sampling,
                      seed=job.seed, eos_token_ids=job.eos_token_ids)
        a = _Active(req, Outbox())
        with self._lock:
            self._active[req.request_id] = a
        try:
            self.post(lambda: self._add(a), on_error=lambda e: self._failed(a, e))
        except EngineDead as e:
            self._pop(req.request_id)
            a.outbox.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, str(e)))
        return _Handle(self, job.request_id, a.outbox)

    def ready(self) -> bool:
        return self.alive and self.warm

    def instances(self) -> list[wpb.InstanceStats]:
        return self.call(self._instances)

    def close(self) -> None:
        self.stop()

    def warmup(self, prompt_len: int = 24, max_tokens: int = 56) -> None:
        """Compile the common programs with one short greedy request (blocks until done)."""
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for _ in self.submit(GenerateJob(request_id="warmup", prompt_token_ids=[1] * prompt_len, sampling=sp, seed=0,
                                         eos_token_ids=())).events():
            pass

    def _pop(self, request_id: str) -> _Active | None:
        with self._lock:
            return self._active.pop(request_id, None)

    # ---- engine thread -------------------------------------------------------------------
    def _add(self, a: _Active) -> None:
        try:
            self.engine.add_request(a.request)
        except ValueError as e:
            self._pop(a.request.request_id)
            a.outbox.put(ErrorEvent(grpc.StatusCode.INVALID_ARGUMENT, str(e)))

    def _failed(self, a: _Active, error: Exception) -> None:
        """Adding the request failed unexpectedly: it ends with INTERNAL, its blocks freed."""
        if self._pop(a.request.request_id) is not None:
            self.engine.abort(a.request.request_id)
            a.outbox.put(ErrorEvent(grpc.StatusCode.INTERNAL, f"the engine could not take the request: {error!r}"))

    def _abort(self, request_id: str) -> None:
        a = self._pop(request_id)
        if a is not None:
            self.engine.abort(request_id)
            a.outbox.put(FinishEvent(FinishReason.CANCELLED, _breakdown(self.engine, a.request)))

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> bool:
        self.engine.step()
        with self._lock:
            active = list(self._active.items())
        for rid, a in active:
            out = a.request.output_token_ids
            if len(out) > a.sent:
                a.outbox.put(TokenEvent(tuple(out[a.sent :])))
                a.sent = len(out)
            if a.request.status is Status.FINISHED:
                self._pop(rid)
                a.outbox.put(FinishEvent(a.request.finish_reason, _breakdown(self.engine, a.request)))
        return True

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            active, self._active = list(self._active.values()), {}
        for a in active:
            a.outbox.put(ErrorEvent(grpc.StatusCode.INTERNAL, f"engine failed: {error!r}"))

    def _instances(self) -> list[wpb.InstanceStats]:
        return _instance_stats(self.engine, alive=self.alive)


def _instance_stats(e, alive: bool) -> list[wpb.InstanceStats]:
    pid = os.getpid()

    def stats(name, role, inst, **kw):
        b, r = inst.blocks, inst.runner
        return wpb.InstanceStats(worker_id=name, role=role, address="inprocess", pid=pid, num_blocks=b.capacity_blocks,
                                 free_blocks=b.num_free_blocks, alive=alive, pp=r.pp, tp=len(r.devices()) // r.pp,
                                 **host_time_fields(r), **kw)

    if isinstance(e, DisaggEngine):
        return [stats(f"prefill-{i}", wpb.PREFILL, p, waiting=len(p.waiting), held=len(p.ready)) for i, p in enumerate(e.prefill)] + [
            stats(f"decode-{i}", wpb.DECODE, d, running=len(d.running), migrations=d.migrations, kv_bytes=d.bytes_pulled)
            for i, d in enumerate(e.decode)
        ]
    engines = e.engines if isinstance(e, ReplicatedEngine) else [e]
    return [stats(f"engine-{i}", wpb.COLOCATED, x, waiting=len(x.waiting), running=len(x.running)) for i, x in enumerate(engines)]


class ThreadedBackend:
    """A `DisaggEngine` with one thread per instance (dsjax/engine/threaded.py)."""

    def __init__(self, engine: DisaggEngine):
        self.engine = engine
        self.threaded = ThreadedDisaggEngine(engine, on_update=self._on_update)
        self.warm = False
        self._lock = threading.Lock()  # on_update (outside the engine lock), submit, abort: never around the engine lock
        self._active: dict[str, _Active] = {}
        self._closed = threading.Event()

    def start(self) -> None:
        self.threaded.start()
        threading.Thread(target=self._watch, name="threaded-watch", daemon=True).start()

    def _watch(self) -> None:
        """An instance thread that dies ends every stream (instead of leaving them hanging)."""
        while not self._closed.wait(0.2):
            if self.threaded.errors:
                with self._lock:
                    active, self._active = list(self._active.values()), {}
                for a in active:
                    a.outbox.put(ErrorEvent(grpc.StatusCode.INTERNAL, f"engine failed: {self.threaded.errors[0]!r}"))

    def submit(self, job: GenerateJob) -> "_ThreadedHandle":
        req = Request(request_id=job.request_id, prompt_token_ids=list(job.prompt_token_ids), sampling=job.sampling,
                      seed=job.seed, eos_token_ids=job.eos_token_ids)
        a = _Active(req, Outbox())
        if self.threaded.errors:
            a.outbox.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, f"engine failed: {self.threaded.errors[0]!r}"))
            return _ThreadedHandle(self, req.request_id, a.outbox)
        with self._lock:
            self._active[req.request_id] = a
        try:
            self.threaded.add_request(req)
        except ValueError as e:
            with self._lock:
                self._active.pop(req.request_id, None)
            a.outbox.put(ErrorEvent(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
        return _ThreadedHandle(self, req.request_id, a.outbox)

    def _on_update(self, reqs: list[Request]) -> None:
        """One batch's updates under one acquisition of the lock (ten decode threads taking it
        once per request convoyed on it and on the interpreter lock).

        Another instance's thread may append to a request while this reads it (a prefill
        collector's update runs after the request was pulled to decode), so the tokens sent are
        the slice taken, counted by its length, and a finish is believed only if seen before
        the slice (a request's tokens are appended before it is marked finished)."""
        with self._lock:
            for req in reqs:
                a = self._active.get(req.request_id)
                if a is None:
                    continue
                done = req.status is Status.FINISHED
                new = req.output_token_ids[a.sent :]
                if new:
                    a.outbox.put(TokenEvent(tuple(new)))
                    a.sent += len(new)
                if done:
                    del self._active[req.request_id]
                    a.outbox.put(FinishEvent(req.finish_reason, _breakdown(self.engine, req)))

    def abort(self, request_id: str) -> None:
        self.threaded.abort(request_id)
        with self._lock:
            a = self._active.pop(request_id, None)
        if a is not None:
            a.outbox.put(FinishEvent(FinishReason.CANCELLED, _breakdown(self.engine, a.request)))

    def ready(self) -> bool:
        return self.warm and not self.threaded.errors

    def instances(self) -> list[wpb.InstanceStats]:
        # Counts read without the engine lock: each is consistent by itself, which is what the
        # debug endpoint and the gauges need.
        return _instance_stats(self.engine, alive=not self.threaded.errors)

    def warmup(self, prompt_len: int = 24, max_tokens: int = 56) -> None:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        job = GenerateJob(request_id="warmup", prompt_token_ids=[1] * prompt_len, sampling=sp, seed=0, eos_token_ids=())
        for _ in self.submit(job).events():
            pass

    def close(self) -> None:
        self._closed.set()
        self.threaded.stop()


class _ThreadedHandle:
    def __init__(self, backend: ThreadedBackend, request_id: str, outbox: Outbox):
        self._backend, self._id, self._outbox = backend, request_id, outbox
        self.outbox = outbox  # for readers in an event loop (Handle.outbox)

    def events(self):
        return iter(self._outbox)

    def cancel(self) -> None:
        if not self._outbox.closed:
            self._backend.abort(self._id)


def _breakdown(engine, req: Request) -> dict:
    out = dict(req.lifecycle.breakdown())
    if isinstance(engine, DisaggEngine) and req.lifecycle.migration_start is not None:
        out["kv_bytes"] = engine.prefill[0].runner.kv_bytes(req.prompt_len)
    out["recomputes"] = req.lifecycle.num_preemptions
    return out
