"""Test helpers for the serving layer: reading the debug endpoint, waiting for idle instances, and a
deterministic fake backend (no jax) for exercising the router over real gRPC. Launching a server
process and waiting for it to serve are the benchmark's helpers (dsjax/bench/servers.py),
re-exported here for the tests.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc

from dsjax.bench.servers import free_port, launch_server, stop_server, wait_serving  # noqa: F401 (re-exported)
from dsjax.engine.request import FinishReason
from serving.cluster_auth import TOKEN_ENV, with_token
from serving.backend import GenerateJob
from serving.engine_loop import FinishEvent, Outbox, TokenEvent
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.tls import ClusterTLS, dial

REPO = Path(__file__).resolve().parents[2]


def debug_instances(metrics_port: int, *, token: str | None = "env") -> dict:
    """The metrics port's /debug/instances, sent with the cluster token ($DSJAX_CLUSTER_TOKEN by
    default; None: without one)."""
    import json
    import urllib.request

    token = os.environ.get(TOKEN_ENV) if token == "env" else token
    req = urllib.request.Request(f"http://localhost:{metrics_port}/debug/instances",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    return json.loads(urllib.request.urlopen(req, timeout=5).read())


def internal_channel(target: str) -> grpc.Channel:
    """A channel to a dsjax server's internal services: its calls carry the cluster token."""
    return with_token(grpc.insecure_channel(target), os.environ.get(TOKEN_ENV))


def instances(target: str) -> list[wpb.InstanceStats]:
    with internal_channel(target) as ch:
        return list(worker_pb2_grpc.AdminStub(ch).Instances(wpb.InstancesRequest(), timeout=10.0).instances)


def instances_over(target: str, tls: ClusterTLS) -> list[wpb.InstanceStats]:
    """`instances` from a cluster listener with mutual TLS (serving/tls.py): the node certificate and the token."""
    with with_token(dial(target, tls), os.environ.get(TOKEN_ENV)) as ch:
        return list(worker_pb2_grpc.AdminStub(ch).Instances(wpb.InstancesRequest(), timeout=10.0).instances)


def wait_idle(target: str, timeout: float = 15.0) -> list[wpb.InstanceStats]:
    """Wait until every live instance has all its blocks free and nothing queued, held or in
    flight, and the router counts no request on it; returns the stats (AssertionError with the
    last stats otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = instances(target)
        busy = [s for s in stats if s.alive and (s.free_blocks != s.num_blocks or s.held or s.pulling or s.running or s.waiting
                                               or s.routed or s.routed_tokens)]
        if not busy:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"instances still hold KV or requests: {busy}")
        time.sleep(0.1)


class FakeBackend:
    """Emits token (prompt[-1] + i) % 256 for i = 1..max_tokens, one per `step_s`, then LENGTH;
    records cancellations. `gate`, when set, holds every request before its first token."""

    def __init__(self, step_s: float = 0.0):
        self.step_s = step_s
        self.gate: threading.Event | None = None
        self.cancelled: set[str] = set()
        self.jobs: list[GenerateJob] = []
        self._lock = threading.Lock()

    def submit(self, job: GenerateJob):
        with self._lock:
            self.jobs.append(job)
        outbox, stop = Outbox(), threading.Event()

        def run():
            if self.gate is not None:
                while not self.gate.wait(0.01):
                    if stop.is_set():
                        break
            for i in range(1, job.sampling.max_tokens + 1):
                if stop.wait(self.step_s) or stop.is_set():
                    outbox.put(FinishEvent(FinishReason.CANCELLED))
                    return
                outbox.put(TokenEvent(((job.prompt_token_ids[-1] + i) % 256,)))
            outbox.put(FinishEvent(FinishReason.LENGTH, {}))

        def cancel():
            with self._lock:
                self.cancelled.add(job.request_id)
            stop.set()

        threading.Thread(target=run, daemon=True).start()
        return _FakeHandle(outbox, cancel)

    def ready(self) -> bool:
        return True

    def instances(self) -> list[wpb.InstanceStats]:
        return [wpb.InstanceStats(worker_id="fake-0", role=wpb.COLOCATED, num_blocks=8, free_blocks=8, alive=True)]

    def close(self) -> None:
        pass


class _FakeHandle:
    def __init__(self, outbox: Outbox, cancel):
        self._outbox, self.cancel = outbox, cancel
        self.outbox = outbox

    def events(self):
        return iter(self._outbox)
