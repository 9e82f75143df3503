"""A disaggregated cluster inside the test process, over real loopback gRPC: the router (Registry
on a listener of its own, RemoteBackend, the public RouterServer) and real prefill and decode
workers (`WorkerProcess`: each serves its gRPC services and registers and heartbeats from a
thread of its own, as in a worker process). Workers can be killed (their server stopped at once,
their heartbeats ended: to the router, a process that died) and started again.

    with LocalCluster(prefill=1, decode=2, hung_s=1.5) as c:
        ids, msgs = c.generate([256, 1, 2], max_tokens=20)
        c.kill("decode-1")
"""

from __future__ import annotations

import os
import threading
import time

import grpc

from dsjax.runtime.kv_cache import CacheConfig
from models.config import PRESETS
from models.tokenizer import load_tokenizer
from serving.channels import InternalServer
from serving.cluster_auth import TOKEN_ENV
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.registry import Registry
from serving.remote import RemoteBackend
from serving.router import AdminServicer, RouterServer
from serving.worker import WorkerConfig, WorkerProcess

MODEL = "tiny-llama"


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class LocalCluster:
    def __init__(self, *, prefill: int = 1, decode: int = 2, hung_s: float | None = None, max_recomputes: int = 2,
                 num_blocks: int = 64, lease_s: float = 30.0, max_lease_s: float | None = None, timeout_s: float = 5.0,
                 decode_step_s: float = 0.0):
        """`decode_step_s`: every decode step takes at least this long (the decode workers' runners
        wait it out on collecting a step), so that a test that acts while requests decode does not
        race a tiny model that finishes them in a fraction of a second."""
        self.decode_step_s = decode_step_s
        self.token = os.environ[TOKEN_ENV]
        self.config = PRESETS[MODEL]
        self.num_blocks, self.lease_s, self.max_lease_s = num_blocks, lease_s, max_lease_s
        self.registry = Registry(cluster_token=self.token, model=MODEL, block_size=16, dtype="float32",
                                 hung_s=hung_s, timeout_s=timeout_s)
        self.backend = RemoteBackend(self.registry, max_recomputes=max_recomputes)
        self.internal = InternalServer([(worker_pb2_grpc.add_RegistryServicer_to_server, self.registry),
                                        (worker_pb2_grpc.add_AdminServicer_to_server, AdminServicer(self.backend))],
                                       host="127.0.0.1", port=0, tls=None, token=self.token).start()
        self.router = RouterServer(self.backend, load_tokenizer(None, self.config), self.config, port=0,
                                   cluster_token=self.token).start()
        self.target = f"127.0.0.1:{self.router.port}"
        self.cluster_target = f"127.0.0.1:{self.internal.port}"
        self.workers: dict[str, WorkerProcess] = {}
        self._threads: dict[str, threading.Thread] = {}
        self.channel = grpc.insecure_channel(self.target)
        try:
            for i in range(prefill):
                self.start_worker("prefill", f"prefill-{i}")
            for i in range(decode):
                self.start_worker("decode", f"decode-{i}")
            self.wait_registered(prefill, decode)
        except BaseException:
            self.close()
            raise

    # ---- workers -------------------------------------------------------------------------
    def start_worker(self, role: str, worker_id: str) -> WorkerProcess:
        cfg = WorkerConfig(role=role, worker_id=worker_id, router=self.cluster_target, model=MODEL, dummy_weights=True,
                           cache=CacheConfig(num_blocks=self.num_blocks, block_size=16), lease_s=self.lease_s,
                           max_lease_s=self.max_lease_s, cluster_token=self.token)
        w = self.workers[worker_id] = WorkerProcess(cfg)
        if role == "decode" and self.decode_step_s > 0:
            _pace(w.engine.inst.runner, self.decode_step_s)
        t = self._threads[worker_id] = threading.Thread(target=w.serve, name=f"serve-{worker_id}", daemon=True)
        t.start()
        return w

    def kill(self, worker_id: str) -> None:
        """As a process that died: calls in flight fail, connections are refused, heartbeats stop."""
        w = self.workers.pop(worker_id)
        w.server.stop(0)
        w.request_stop()
        self._threads.pop(worker_id).join(10)

    def wait_registered(self, prefill: int, decode: int, timeout: float = 60.0) -> None:
        assert self.registry.wait_for(wpb.PREFILL, prefill, timeout), "prefill workers did not register"
        assert self.registry.wait_for(wpb.DECODE, decode, timeout), "decode workers did not register"

    def worker_channel(self, worker_id: str) -> grpc.Channel:
        """A channel to a worker's services carrying the cluster token."""
        return self.registry.channels.get(self.workers[worker_id].address)

    # ---- clients -------------------------------------------------------------------------
    def stream(self, prompt: list[int], max_tokens: int, timeout: float = 60.0):
        return dsjax_pb2_grpc.GenerationStub(self.channel).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=greedy(max_tokens)), timeout=timeout)

    def generate(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[pb.GenerateResponse]]:
        msgs = list(self.stream(prompt, max_tokens))
        return [t for m in msgs for t in m.token_ids], msgs

    def wait_idle(self, timeout: float = 20.0) -> list[wpb.InstanceStats]:
        """Every registered worker with all its blocks free and nothing queued, held or running."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.registry.instances()
            busy = [s for s in stats if not s.alive or s.free_blocks != s.num_blocks or s.held or s.pulling or s.running
                    or s.waiting]
            if not busy:
                return stats
            assert time.monotonic() < deadline, f"instances still hold KV or requests: {busy}"
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()
        self.router.stop(0)
        self.internal.stop(0)
        for wid in list(self.workers):
            self.kill(wid)
        self.backend.close()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pace(runner, step_s: float) -> None:
    """Make `runner.collect` return no sooner than `step_s` after the previous one returned."""
    collect, last = runner.collect, [0.0]

    def paced(launched):
        out = collect(launched)
        left = last[0] + step_s - time.monotonic()
        if left > 0:
            time.sleep(left)
        last[0] = time.monotonic()
        return out

    runner.collect = paced
