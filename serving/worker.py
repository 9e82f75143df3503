"""One worker process: a prefill or decode instance, or a colocated / chunked replica, on this
host's devices, served over gRPC, registered with the router and kept alive by heartbeats.

    python -m dsjax.serve --role decode --router HOST:PORT --decode-tp 1 --model tiny-llama --dummy-weights

(dsjax/serve.py parses a worker's flags, `--attention-backend` among them; serving/launcher.py
passes the router's own on to the workers it starts.)

Start-up order: build the instance on a mesh of `tp * pp` local devices, each stage reading its
weights straight onto its devices (same seed everywhere: identical dummy weights), start the
engine thread, warm up (compile the common programs), serve, then register: the router routes
only to warm workers. Heartbeats carry the instance's stats and how long the engine thread has
been stuck (the router's watchdog); if the router forgets the worker (it restarted) the worker
registers again, with the new router as with the old. A decode worker learns from the replies which
prefill workers it may pull from. With `exit_with_parent`, the worker exits when the process that
started it is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from dsjax.engine.scheduler import SchedulerConfig
from dsjax.runtime.kv_cache import CacheConfig
from serving.channels import OPTIONS, SERVER_OPTIONS, with_message_limit
from serving.cluster_auth import cluster_guard, server_interceptors, with_token
from serving.fingerprint import weights_fingerprint
from serving.kv_transfer import DEFAULT_CHUNK_BYTES
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.tls import ClusterTLS, bind, dial
from serving.worker_checks import Peers

log = logging.getLogger(__name__)


ROLES = ("prefill", "decode", "replica")
PROTO_ROLE = {"prefill": wpb.PREFILL, "decode": wpb.DECODE, "replica": wpb.COLOCATED}


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    role: str  # "prefill" | "decode" | "replica" (both phases on one instance, `mode`)
    worker_id: str
    router: str  # HOST:PORT of the router's Registry
    model: str
    dummy_weights: bool = False
    dtype: str = "float32"
    seed: int = 0
    attention_backend: str = "auto"  # "auto" (the platform's: kernels on GPU, XLA elsewhere), "pallas" or "xla"
    tp: int = 1
    pp: int = 1
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    host: str = "127.0.0.1"  # loopback unless the operator exposes it
    port: int = 0  # 0: any free port
    advertise_host: str = "127.0.0.1"  # how the router and other workers reach this one
    lease_s: float = 30.0
    max_lease_s: float | None = None  # renewals keep a lease at most this long (default 20 x lease_s)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_staged_bytes: int = 512 << 20  # prefill: KV staged off the pool for pulls (serving/prefill_worker.py)
    warmup: bool = True
    exit_with_parent: bool = False
    step_log_dir: str | None = None  # time served steps into DIR/<worker_id>.jsonl (serving/step_log.py)
    warmup_shapes: bool = False  # compile every reachable program shape before registering (dsjax/runtime/warmup.py)
    warmup_share: tuple[int, int] = (0, 1)  # this worker is i of n warming the same shapes at once (warm_shapes' share)
    cluster_token: str | None = None  # required on this worker's services and sent on its calls (serving/cluster_auth.py)
    tls_dir: str | None = None  # mutual TLS on this worker's services and on its calls (serving/tls.py)
    mode: str = "colocated"  # a replica's: "colocated" (prefill first) or "chunked"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} must be one of {ROLES}")
        if self.mode not in ("colocated", "chunked"):
            raise ValueError(f"mode={self.mode!r} must be 'colocated' or 'chunked'")


class _WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine, address: str):
        self.engine, self.address = engine, address

    def Stats(self, request, context):  # noqa: N802
        s = self.engine.stats()
        s.address = self.address
        return s


def server_threads(max_num_seqs: int) -> int:
    """gRPC threads of a worker. A Decode (or replica Generate) stream holds one thread for its
    request's whole life, running or queued for KV, and lease renewals, pulls, stats and health
    need threads too. A fixed 256 stalled OPT-66B ShareGPT decode workers (batch cap 256) near
    their knee: new streams waited for a thread before admission, so nobody renewed their prefill
    KV leases, which expired, and every such request was prefilled again (docs/results.md,
    "Session 12"). So: room for four times the batch cap in streams, plus control calls."""
    return 128 + 4 * max_num_seqs


def model_backend(flag: str) -> str | None:
    """--attention-backend as `load_causal_lm`'s backend: "auto" is the platform's path, fixed for
    every program shape (dsjax.runtime.builder.platform_backend), so the step log can name it."""
    return None if flag == "auto" else flag


def build_instance(cfg: WorkerConfig, runner=None):
    """The role's PrefillInstance, DecodeInstance or ColocatedEngine on the first tp * pp local
    devices, or on `runner` when given (an emulated one, dsjax/runtime/emulated.py: then no jax
    is loaded)."""
    from dsjax.engine.colocated import ColocatedEngine
    from dsjax.engine.disaggregated import DecodeInstance, PrefillInstance

    if runner is None:
        from dsjax.engine.placement import PhaseParallel
        from dsjax.runtime.builder import build_runner, load_causal_lm

        # The weights are read here, each stage's straight onto its mesh (no unsharded copy anywhere).
        model, weights = load_causal_lm(cfg.model, dtype=cfg.dtype, dummy_weights=cfg.dummy_weights, seed=cfg.seed,
                                        backend=model_backend(cfg.attention_backend))
        runner = build_runner(model, weights, cfg.cache, phase=PhaseParallel(tp=cfg.tp, pp=cfg.pp))
    log.info("%s: attention backend %s on %s", cfg.worker_id, runner.attention_backend, runner.devices()[0].platform)
    if cfg.role == "replica":
        return ColocatedEngine(runner, cfg.scheduler, chunked=cfg.mode == "chunked")
    return (PrefillInstance if cfg.role == "prefill" else DecodeInstance)(runner, cfg.scheduler)


class WorkerProcess:
    def __init__(self, cfg: WorkerConfig, runner=None):
        from serving.decode_worker import DecodeWorker
        from serving.prefill_worker import PrefillWorker
        from serving.replica_worker import ReplicaWorker

        self.cfg = cfg
        self.tls = ClusterTLS.load(cfg.tls_dir) if cfg.tls_dir else None
        inst = build_instance(cfg, runner)
        self.peers = Peers()  # decode: the prefill workers the router lists; its `wanted` wakes the heartbeat
        if cfg.role == "prefill":
            self.engine = PrefillWorker(inst, worker_id=cfg.worker_id, lease_s=cfg.lease_s, chunk_bytes=cfg.chunk_bytes,
                                        max_staged_bytes=cfg.max_staged_bytes, max_lease_s=cfg.max_lease_s)
        elif cfg.role == "replica":
            self.engine = ReplicaWorker(inst, worker_id=cfg.worker_id, chunk_bytes=cfg.chunk_bytes)
        else:
            self.engine = DecodeWorker(inst, worker_id=cfg.worker_id, chunk_bytes=cfg.chunk_bytes,
                                       cluster_token=cfg.cluster_token, tls=self.tls, peers=self.peers)
        self.engine.start()
        if cfg.warmup:
            t = time.perf_counter()
            self.engine.warmup()
            log.info("%s warmed up in %.1fs", cfg.worker_id, time.perf_counter() - t)
        if cfg.warmup_shapes:
            from dsjax.runtime.warmup import warm_runner

            prefill, decode = cfg.role != "decode", cfg.role != "prefill"
            self.engine.call(lambda: warm_runner(inst.runner, cfg.scheduler, prefill=prefill, decode=decode,
                                                 prefix=cfg.role == "replica" and cfg.mode == "chunked",
                                                 log=lambda m: log.info("%s: %s", cfg.worker_id, m),
                                                 share=cfg.warmup_share), timeout=None)
        self.step_log = None
        if cfg.step_log_dir:
            from serving.step_log import StepLog

            self.step_log = StepLog(os.path.join(cfg.step_log_dir, f"{cfg.worker_id}.jsonl"),
                                    backend=inst.runner.attention_backend)
            self.engine.attach_step_log(self.step_log, [inst.runner])
        # Messages up to one KV chunk or one request of a whole context (serving/worker_checks.py).
        options = with_message_limit(SERVER_OPTIONS, self.engine.limits.message_bytes())
        guard = cluster_guard(cfg.cluster_token) if cfg.cluster_token else None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=server_threads(cfg.scheduler.max_num_seqs),
                                                             thread_name_prefix=cfg.worker_id), options=options,
                                  interceptors=server_interceptors(guard))
        if cfg.role == "prefill":
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self.engine, self.server)
        elif cfg.role == "replica":
            worker_pb2_grpc.add_ReplicaWorkerServicer_to_server(self.engine, self.server)
        else:
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self.engine, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = bind(self.server, f"{cfg.host}:{cfg.port}", self.tls)
        if port == 0:
            raise RuntimeError(f"could not bind worker {cfg.worker_id} to {cfg.host}:{cfg.port}")
        self.address = f"{cfg.advertise_host}:{port}"
        worker_pb2_grpc.add_WorkerServicer_to_server(_WorkerServicer(self.engine, self.address), self.server)
        self.info = wpb.WorkerInfo(
            worker_id=cfg.worker_id, role=PROTO_ROLE[cfg.role], address=self.address,
            pid=os.getpid(), tp=cfg.tp, pp=cfg.pp, model=cfg.model, block_size=cfg.cache.block_size, dtype=cfg.dtype,
            weights_hash=weights_fingerprint(cfg.model, dummy_weights=cfg.dummy_weights, seed=cfg.seed) or "",
        )
        self._stop = threading.Event()
        self._parent = os.getppid()

    def serve(self) -> None:
        """Serve until stopped; registers and heartbeats on this thread."""
        self.server.start()
        log.info("%s serving at %s", self.cfg.worker_id, self.address)
        channel = with_token(dial(self.cfg.router, self.tls, OPTIONS), self.cfg.cluster_token)
        registry = worker_pb2_grpc.RegistryStub(channel)
        interval, registered, stats = 0.5, False, wpb.InstanceStats(worker_id=self.cfg.worker_id, pid=os.getpid(), alive=True)
        while not self._stop.is_set():
            if self.cfg.exit_with_parent and os.getppid() != self._parent:
                log.warning("%s: parent process gone, exiting", self.cfg.worker_id)
                break
            if not self.engine.alive:
                log.error("%s: engine thread died (%r), exiting", self.cfg.worker_id, self.engine.error)
                break
            try:
                if not registered:
                    reply = registry.Register(self.info, timeout=5.0)
                    interval, registered = reply.heartbeat_seconds or interval, True
                    log.info("%s registered with the router at %s", self.cfg.worker_id, self.cfg.router)
                else:
                    stats = self._stats(stats)
                    reply = registry.Heartbeat(wpb.HeartbeatRequest(worker_id=self.cfg.worker_id, stats=stats), timeout=5.0)
                    registered = reply.registered
                if registered:
                    self.peers.update(reply.prefill_addresses)
            except grpc.RpcError as e:  # the router is down or restarting, or refuses us: keep trying
                refused = e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED)
                log.log(logging.ERROR if refused else logging.DEBUG, "%s: router at %s: %s %s", self.cfg.worker_id,
                        self.cfg.router, e.code().name, e.details() if refused else "(unreachable)")
                registered = False
            self.peers.wanted.wait(interval)  # the interval, or at once when a Decode names an unknown source
            self.peers.wanted.clear()
        self.stop()

    def _stats(self, last: wpb.InstanceStats) -> wpb.InstanceStats:
        """Fresh stats if the engine thread answers quickly, else the last ones: liveness is the
        process answering, not the engine being between steps (a compile can take seconds)."""
        try:
            stats = self.engine.stats(timeout=0.25)
        except TimeoutError:
            stats = last
        stats.address = self.address
        stats.stalled_seconds = self.engine.stalled_seconds()  # fresh even when the engine does not answer
        return stats

    def request_stop(self) -> None:
        self._stop.set()
        self.peers.wanted.set()

    def stop(self) -> None:
        self._stop.set()
        self.server.stop(1.0).wait()
        self.engine.stop()
        if self.step_log is not None:
            self.step_log.close()
