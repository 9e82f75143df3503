"""Colocated replicas in one process, each on an engine thread of its own.

`ReplicatedEngine` (dsjax/engine/colocated.py) steps every replica from one loop, so while one
replica waits for its step the others wait too: right for a demo on one host's devices, wrong for
emulated devices (dsjax/runtime/emulated.py), where every replica is a separate accelerator whose
step is a sleep. `ReplicatedBackend` gives each replica its own `InProcessBackend` (one engine
thread each) behind one router, and sends a request to the replica holding the fewest reserved KV
tokens: prompt + max_tokens of its unfinished requests, counted here from submit to finish
(`policies.least_loaded`, ties to the lowest index), which is the load the planner's simulator
dispatches colocated replicas by (`SimColocatedInstance.load`).
"""

from __future__ import annotations

import threading

from dsjax.engine.colocated import ColocatedEngine
from dsjax.engine.policies import least_loaded
from dsjax.engine.request import Request
from serving.backend import GenerateJob
from serving.inprocess import InProcessBackend
from serving.proto.dsjax.v1 import worker_pb2 as wpb


class _Replica(InProcessBackend):
    """One replica's engine thread; tells the parent when a request leaves it."""

    def __init__(self, engine: ColocatedEngine, index: int, parent: "ReplicatedBackend"):
        super().__init__(engine)
        self._index, self._parent = index, parent

    def _pop(self, request_id: str):
        a = super()._pop(request_id)
        if a is not None:
            self._parent._left(self._index, a.request)
        return a


class ReplicatedBackend:
    def __init__(self, engines: list[ColocatedEngine]):
        if not engines:
            raise ValueError("ReplicatedBackend needs at least one engine")
        self.replicas = [_Replica(e, i, self) for i, e in enumerate(engines)]
        self._lock = threading.Lock()
        self._load = [0] * len(engines)  # reserved KV tokens of each replica's unfinished requests

    @property
    def warm(self) -> bool:
        return all(r.warm for r in self.replicas)

    @warm.setter
    def warm(self, value: bool) -> None:
        for r in self.replicas:
            r.warm = value

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def submit(self, job: GenerateJob):
        need = len(job.prompt_token_ids) + job.sampling.max_tokens
        with self._lock:
            i = least_loaded(self._load)
            self._load[i] += need
        return self.replicas[i].submit(job)

    def _left(self, index: int, req: Request) -> None:
        with self._lock:
            self._load[index] -= req.peak_tokens

    def ready(self) -> bool:
        return all(r.ready() for r in self.replicas)

    def instances(self) -> list[wpb.InstanceStats]:
        out = []
        for i, r in enumerate(self.replicas):
            for s in r.instances():
                s.worker_id = f"engine-{i}"
                out.append(s)
        return out

    def busy(self) -> bool:
        return any(r.busy() for r in self.replicas)

    def close(self) -> None:
        for r in self.replicas:
            r.close()
