"""Disaggregation in one process, for real: every instance on its own host thread.

`DisaggEngine.step` drives all instances from one loop, so a decode step still waits for the
prefill dispatched before it. Here each prefill and each decode instance runs its own loop:

    prefill thread:  [lock] pick + dispatch -> wait for tokens -> [lock] record, stage KV
    decode thread:   [lock] pull staged KV + pick + dispatch -> wait for tokens -> [lock] record

One lock guards all host bookkeeping (queues, block managers, request records); device work is
dispatched under it (fast: JAX dispatch is asynchronous) and waited for outside it, so instances on
different devices compute at the same time.

KV staging: a decode pull that gathered from the prefill pool would be ordered after whatever
prefill was dispatched last on that pool (the pool is one donated buffer chain), i.e. decode would
wait for a running prefill. So the prefill thread gathers each prefilled request's blocks into
standalone arrays right when its prefill completes, before it dispatches the next batch; the decode
thread moves those. The request keeps its prefill blocks until it is pulled, so prefill memory
still buffers bursts and backpressure is unchanged; the staged copy costs as much device memory
again for requests waiting to be pulled.
"""

from __future__ import annotations

import threading
from typing import Callable

from dsjax.engine.disaggregated import DecodeInstance, DisaggEngine, PrefillInstance
from dsjax.engine.request import Request


class ThreadedDisaggEngine:
    def __init__(self, engine: DisaggEngine, on_update: Callable[[Request], None] | None = None):
        """`on_update(req)` runs (under the engine lock) whenever a request got tokens or finished."""
        self.engine = engine
        self.on_update = on_update or (lambda req: None)
        self._cv = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "ThreadedDisaggEngine":
        for i, inst in enumerate(self.engine.prefill):
            self._threads.append(threading.Thread(target=self._guard, args=(self._prefill_loop, inst), name=f"prefill-{i}", daemon=True))
        for i, inst in enumerate(self.engine.decode):
            self._threads.append(threading.Thread(target=self._guard, args=(self._decode_loop, inst), name=f"decode-{i}", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        with self._cv:
            self.engine.add_request(req)
            self._cv.notify_all()

    def abort(self, request_id: str) -> bool:
        with self._cv:
            return self.engine.abort(request_id)

    def has_unfinished(self) -> bool:
        with self._cv:
            return self.engine.has_unfinished()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every request has finished (True) or `timeout` passes (False); re-raises
        an error from an instance thread."""
        with self._cv:
            done = self._cv.wait_for(lambda: self.errors or not self.engine.has_unfinished(), timeout)
            if self.errors:
                raise RuntimeError("an instance thread failed") from self.errors[0]
            return bool(done)

    # ---- instance loops --------------------------------------------------------------------
    def _guard(self, loop, inst) -> None:
        try:
            loop(inst)
        except BaseException as e:  # surfaced by wait(); the other instances keep their state
            with self._cv:
                self.errors.append(e)
                self._cv.notify_all()

    def _prefill_loop(self, inst: PrefillInstance) -> None:
        while True:
            with self._cv:
                pending = None
                while not self._stop and (pending := inst.launch()) is None:
                    self._cv.wait()
                if self._stop:
                    return
            outs = inst.runner.collect(pending[1])
            with self._cv:
                prefilled, finished = inst.complete(pending, outs, stage_kv=True)
                self.engine._done(finished)
                for r in prefilled + finished:
                    self.on_update(r)
                self._cv.notify_all()

    def _decode_loop(self, inst: DecodeInstance) -> None:
        while True:
            with self._cv:
                batch: list[Request] = []
                while not self._stop:
                    self.engine._pull()
                    batch, preempted, launched = inst.launch()
                    self.engine.requeue(preempted)
                    if preempted:
                        self._cv.notify_all()
                    if batch:
                        break
                    self._cv.wait()
                if self._stop:
                    return
            outs = inst.runner.collect(launched)
            with self._cv:
                finished = inst.complete(batch, outs)
                self.engine._done(finished)
                for r in batch:
                    self.on_update(r)
                self._cv.notify_all()
