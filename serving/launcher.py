"""What `python -m dsjax.serve` runs, by role (dsjax/serve.py parses the flags):

    no --role, --workers inprocess   router + one engine from build_engine in this process
    no --role, --workers processes   router here + prefill/decode worker processes (supervised), or
                                     with --mode colocated / chunked one replica worker process each
    --role router                    router only; workers register from other hosts
    --role prefill | decode | replica  one worker (serving/worker.py)
    --emulate PROFILE (any of them)  the same on emulated devices (dsjax/emulate.py): no jax, no weights
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path

from serving.gc_pauses import log_pauses, process_pauses, serving_ready

log = logging.getLogger("dsjax.serve")
DEFAULT_CLUSTER_PORT = 50052  # the cluster's own listener (with TLS on, or --cluster-port)


def _ready(args: argparse.Namespace) -> None:
    serving_ready(freeze=not getattr(args, "no_gc_freeze", False), young_threshold=getattr(args, "gc_young_threshold", None), log=log)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _setup_jax(args: argparse.Namespace) -> None:
    import jax

    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _dummy(args: argparse.Namespace) -> bool:
    """Presets have no weights: dummy weights are implied."""
    return args.dummy_weights or not Path(args.model).is_dir()


def _scheduler(args: argparse.Namespace):
    from dsjax.engine.scheduler import SchedulerConfig

    return SchedulerConfig(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
                           max_model_len=args.max_model_len, overlap_decode=args.overlap_decode)


def _cache_and_scheduler(args: argparse.Namespace, config, dtype_bytes: int):
    from dsjax.llm import default_num_blocks
    from dsjax.runtime.kv_cache import CacheConfig

    sched = _scheduler(args)
    sized = dataclasses.replace(config, max_position=sched.context_len(config.max_position))
    num_blocks = args.num_blocks or default_num_blocks(sized, args.block_size, sched.max_num_seqs, dtype_bytes)
    return CacheConfig(num_blocks=num_blocks, block_size=args.block_size), sched


def _cluster_token(*, create: bool = False) -> str:
    """The cluster's shared secret (serving/cluster_auth.py); a clear exit when a hand-started
    role has none."""
    from serving.cluster_auth import cluster_token

    try:
        return cluster_token(create=create)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _limits(args: argparse.Namespace):
    from serving.validation import Limits

    return Limits(max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens_limit, max_model_len=args.max_model_len)


class _Fronts:
    """What a router process listens on: gRPC (Generate, Admin, health), the OpenAI HTTP API and
    the metrics endpoint. `close` stops them all (the backend is the caller's).

    With --tls-dir, --api-tls-cert or --cluster-port, the cluster's services (`extra_servicers`,
    the worker Registry, and Admin) get a listener of their own on --cluster-port (mutual TLS with
    --tls-dir), and the public port serves only Generate, health and reflection (TLS with
    --api-tls-cert); `cluster_port` is then that listener's port. Without them a Registry still gets
    a listener (and a thread pool) of its own on any free port, where the launcher's own workers
    register and heartbeat, and the public port serves it as well (hand-started workers)."""

    def __init__(self, args, backend, config, extra_servicers=(), *, cluster_token: str):
        from models.tokenizer import load_tokenizer
        from serving.channels import InternalServer
        from serving.prometheus import MetricsServer
        from serving.proto.dsjax.v1 import worker_pb2_grpc
        from serving.router import AdminServicer, RouterServer
        from serving.tls import api_server_credentials, cluster_tls

        model_dir = Path(args.model) if Path(args.model).is_dir() else None
        tls, api_tls = cluster_tls(args.tls_dir), api_server_credentials(args.api_tls_cert, args.api_tls_key)
        split = tls is not None or api_tls is not None or args.cluster_port is not None
        self.router = RouterServer(backend, load_tokenizer(model_dir, config), config, port=args.port, host=args.host,
                                   limits=_limits(args), max_pending=args.max_pending,
                                   extra_servicers=() if split else extra_servicers, api_key=args.api_key,
                                   cluster_token=cluster_token, credentials=api_tls, admin=not split).start()
        log.info("router listening on %s:%d%s", args.host, self.router.port, " (TLS)" if api_tls else "")
        self.cluster, self.cluster_port = None, self.router.port
        if split or extra_servicers:  # heartbeats never queue behind Generate streams
            servicers = [*extra_servicers, (worker_pb2_grpc.add_AdminServicer_to_server, AdminServicer(backend))]
            port = (DEFAULT_CLUSTER_PORT if split else 0) if args.cluster_port is None else args.cluster_port
            self.cluster = InternalServer(servicers, host=args.host, port=port, tls=tls, token=cluster_token).start()
            self.cluster_port = self.cluster.port
            log.info("cluster services (Registry, Admin) on %s:%d (%s)", args.host, self.cluster_port,
                     f"mutual TLS, CA {tls.source}" if tls else "plaintext, cluster token")
        self.http = None
        if args.http_port != 0:
            from serving.http_server import HttpServer, OpenAIApp

            api = OpenAIApp(self.router.generation, model_names=[config.name, args.model], ready=backend.ready,
                            metrics_text=self.router.metrics.text, api_key=args.api_key)
            self.http = HttpServer(api, host=args.host, port=max(0, args.http_port), ssl_certfile=args.api_tls_cert,
                                   ssl_keyfile=args.api_tls_key).start()
            log.info("OpenAI HTTP%s API on %s:%d (/v1/completions, /v1/chat/completions, /v1/models)",
                     "S" if api_tls else "", args.host, self.http.port)
        self.router.metrics.registry.register(process_pauses())  # dsjax_gc_* on both /metrics
        self.metrics = None
        if args.metrics_port >= 0:
            self.metrics = MetricsServer(self.router.metrics, backend.instances, args.metrics_port, host=args.host,
                                         cluster_token=cluster_token)
            log.info("metrics on :%d (/metrics; /debug/instances with the cluster token)", self.metrics.port)

    def close(self) -> None:
        self.router.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.http is not None:
            self.http.stop()
        if self.metrics is not None:
            self.metrics.close()


def run_inprocess(args: argparse.Namespace, placement) -> int:
    _setup_jax(args)
    import jax
    import jax.numpy as jnp

    from dsjax.engine.disaggregated import DisaggEngine
    from dsjax.runtime.builder import build_engine, load_causal_lm
    from serving.inprocess import InProcessBackend, ThreadedBackend
    from serving.worker import model_backend

    t0 = time.perf_counter()
    placement = _fit_devices(args, placement, jax.devices())
    # Nothing is read yet: each instance's runners load their stages' weights straight onto their
    # meshes (tensor by tensor, sharded), so no unsharded copy exists, here or on any device.
    model, weights = load_causal_lm(args.model, dtype=args.dtype, dummy_weights=_dummy(args), seed=args.seed,
                                    backend=model_backend(args.attention_backend))
    config = model.config
    cache, sched = _cache_and_scheduler(args, config, jnp.dtype(model.dtype).itemsize)
    engine = build_engine(model, weights, placement=placement, mode=placement.mode, cache=cache, scheduler=sched)
    del weights
    backend = ThreadedBackend(engine) if isinstance(engine, DisaggEngine) else InProcessBackend(engine)
    fronts = _Fronts(args, backend, config, cluster_token=_cluster_token(create=True))
    backend.start()
    if not args.no_warmup:
        backend.warmup()
    if args.warmup_shapes:
        _warm_engine_shapes(backend, engine, sched, share=getattr(args, "warmup_share", (0, 1)))
    backend.warm = True
    step_log = _attach_step_log(args, backend, engine)
    _ready(args)
    log.info("%s %s ready in %.1fs (%s, attention backend %s)", args.model, placement.mode, time.perf_counter() - t0,
             placement.to_dict(), model.backend)
    return _serve_until_signal(fronts, backend, step_log)


def _serve_until_signal(fronts, backend, step_log) -> int:
    """Serve until SIGINT/SIGTERM, then close the fronts first (no new requests), then the engine."""
    _wait_for_signal()
    fronts.close()
    backend.close()
    if step_log is not None:
        step_log.close()
    log_pauses(log)
    return 0


def run_emulated(args: argparse.Namespace, placement, emulation) -> int:
    """--emulate with in-process workers: the engine's instances on emulated devices
    (dsjax/emulate.py), with no jax, no weights and nothing to warm up."""
    from dsjax.engine.colocated import ReplicatedEngine
    from dsjax.engine.disaggregated import DisaggEngine
    from serving.inprocess import InProcessBackend, ThreadedBackend
    from serving.replicated import ReplicatedBackend

    t0 = time.perf_counter()
    try:
        engine = emulation.build_engine(placement, scheduler=_scheduler(args), block_size=args.block_size,
                                        num_blocks=args.num_blocks)
    except ValueError as e:
        raise SystemExit(f"--emulate: {e}") from None
    if isinstance(engine, ReplicatedEngine):  # one engine thread per replica: each is a device of its own
        if args.step_log:
            raise SystemExit("--step-log times one engine loop; emulated replicas run one each: serve one replica")
        backend = ReplicatedBackend(engine.engines)
    else:
        backend = ThreadedBackend(engine) if isinstance(engine, DisaggEngine) else InProcessBackend(engine)
    fronts = _Fronts(args, backend, emulation.config, cluster_token=_cluster_token(create=True))
    backend.start()
    backend.warm = True
    step_log = _attach_step_log(args, backend, engine)
    _ready(args)
    log.info("%s ready in %.1fs: %s", placement.mode, time.perf_counter() - t0, emulation.describe(placement, args.block_size, args.num_blocks))
    return _serve_until_signal(fronts, backend, step_log)


def _fit_devices(args: argparse.Namespace, placement, devices: list):
    """The in-process placement on `devices` (those jax sees). With no --mode and no --plan, one
    device serves colocated (the default disaggregated placement puts each phase on its own
    device); a placement that needs more devices than there are exits with what to change."""
    from dsjax.engine.placement import Placement

    if len(devices) == 1 and placement.mode == "disaggregated" and args.mode is None and not args.plan:
        log.info("1 device: serving colocated (disaggregation needs a device per phase; --mode overrides)")
        placement = Placement(prefill=placement.prefill, decode=placement.prefill, mode="colocated")
    if placement.num_devices > len(devices):
        n, platform = len(devices), devices[0].platform
        if placement.mode == "disaggregated":
            fix = "serve --mode colocated or --mode chunked, or give the process more devices"
            need = "prefill and decode each on devices of their own"
        else:
            fix, need = "lower --prefill-tp/-pp/-replicas, or give the process more devices", "tp x pp x replicas"
        if platform == "cpu":
            fix += (" (on a CPU host XLA_FLAGS=--xla_force_host_platform_device_count=N; without it the server "
                    "makes as many as the placement needs)")
        raise SystemExit(f"mode {placement.mode} needs {placement.num_devices} devices ({need}) and jax sees {n} "
                         f"{platform} device{'s' if n > 1 else ''}: {fix}")
    return placement


def _colocated_engines(engine) -> list:
    """The colocated engines an in-process engine consists of ([] for the disaggregated one)."""
    from dsjax.engine.colocated import ColocatedEngine, ReplicatedEngine

    if isinstance(engine, ColocatedEngine):
        return [engine]
    return list(engine.engines) if isinstance(engine, ReplicatedEngine) else []


def _warm_engine_shapes(backend, engine, sched, share: tuple[int, int] = (0, 1)) -> None:
    """--warmup-shapes for in-process engines (the disaggregated one: both instances' runners);
    `share` (--warmup-share): this server is one of several replicas warming at once."""
    from dsjax.engine.disaggregated import DisaggEngine
    from dsjax.runtime.warmup import warm_runner

    say = lambda m: log.info("%s", m)  # noqa: E731
    if isinstance(engine, DisaggEngine):
        jobs = [(i.runner, dict(decode=False)) for i in engine.prefill] + \
               [(i.runner, dict(prefill=False)) for i in engine.decode]
        for runner, kw in jobs:  # the threaded backend: no loop thread runs steps before warm = True
            warm_runner(runner, sched, log=say, share=share, **kw)
        return
    for e in _colocated_engines(engine):
        backend.call(lambda e=e: warm_runner(e.runner, sched, prefix=e.chunked, log=say, share=share), timeout=None)


def _attach_step_log(args: argparse.Namespace, backend, engine):
    """--step-log for an in-process engine: DIR/engine-PID.jsonl (colocated and chunked engines)."""
    if not args.step_log:
        return None
    from serving.step_log import StepLog

    engines = _colocated_engines(engine)
    if not engines:
        raise SystemExit("--step-log times one engine loop; the in-process disaggregated engine runs a thread per "
                         "instance: use --workers processes (each worker writes its own log)")
    step_log = StepLog(os.path.join(args.step_log, f"engine-{os.getpid()}.jsonl"),
                       backend=engines[0].runner.attention_backend)
    backend.attach_step_log(step_log, [e.runner for e in engines])
    return step_log


def _worker_argv(args: argparse.Namespace, role: str, worker_id: str, router: str) -> list[str]:
    argv = ["--role", role, "--worker-id", worker_id, "--router", router, "--port", "0", "--model", args.model,
            "--dtype", args.dtype, "--seed", str(args.seed), "--block-size", str(args.block_size),
            "--max-num-seqs", str(args.max_num_seqs), "--max-prefill-tokens", str(args.max_prefill_tokens),
            "--lease-seconds", str(args.lease_seconds), "--kv-chunk-bytes", str(args.kv_chunk_bytes),
            "--max-lease-seconds", str(args.max_lease_seconds or 20 * args.lease_seconds),
            "--kv-staging-mib", str(args.kv_staging_mib),
            "--attention-backend", args.attention_backend, "--compilation-cache", args.compilation_cache,
            "--log-level", args.log_level, "--exit-with-parent"]
    if _dummy(args):
        argv.append("--dummy-weights")
    if args.num_blocks:
        argv += ["--num-blocks", str(args.num_blocks)]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if not args.overlap_decode:
        argv.append("--no-overlap-decode")
    if args.no_warmup:
        argv.append("--no-warmup")
    if args.step_log:
        argv += ["--step-log", args.step_log]
    if args.warmup_shapes:
        argv.append("--warmup-shapes")
    if getattr(args, "stream_interval_ms", 0) > 0:  # decode workers batch their streams' later tokens
        argv += ["--stream-interval-ms", repr(args.stream_interval_ms)]
    if args.tls_dir:
        argv += ["--tls-dir", os.path.abspath(args.tls_dir)]
    argv += (["--no-gc-freeze"] if getattr(args, "no_gc_freeze", False) else []) + \
        ["--gc-young-threshold", str(getattr(args, "gc_young_threshold", 0) or 0)]
    return argv


def cluster_registry(args: argparse.Namespace, token: str | None, replicas: bool = False):
    """The router's worker Registry: the cluster's fingerprint (model, block size, dtype, weights
    hash: serving/fingerprint.py) and its calls to the workers (the token, mutual TLS with --tls-dir)."""
    from serving.fingerprint import weights_fingerprint
    from serving.proto.dsjax.v1 import worker_pb2 as wpb
    from serving.registry import Registry
    from serving.tls import cluster_tls

    from serving.validation import model_config
    from serving.worker_checks import WorkerLimits

    weights_hash = weights_fingerprint(args.model, dummy_weights=_dummy(args), seed=args.seed)
    if weights_hash is None:
        log.warning("no *.safetensors under %s here: the first worker to register fixes the cluster's weights hash",
                    args.model)
    config = model_config(args.model)
    largest = WorkerLimits(vocab_size=config.vocab_size, context=config.max_position, max_chunk_bytes=0).request_bytes()
    return Registry(cluster_token=token, model=args.model, block_size=args.block_size, dtype=args.dtype,
                    weights_hash=weights_hash, pin=("weights_hash",), tls=cluster_tls(args.tls_dir),
                    hung_s=args.hung_worker_seconds or None, max_message=max(largest, 4 << 20),
                    roles=(wpb.COLOCATED,) if replicas else (wpb.PREFILL, wpb.DECODE))


def run_router(args: argparse.Namespace, placement, emulation=None) -> int:
    from serving.proto.dsjax.v1 import worker_pb2_grpc
    from serving.remote import MAX_PREFILL_INFLIGHT, RemoteBackend
    from serving.supervisor import Supervisor, WorkerSpec, assign_gpus
    from serving.validation import model_config

    if emulation is not None:
        emulation.check(placement)
        log.info("%s", emulation.describe(placement, args.block_size, args.num_blocks))
    config = model_config(args.model)
    token = _cluster_token(create=args.role is None)  # the workers started here inherit it
    replicas = placement.mode != "disaggregated"
    registry = cluster_registry(args, token, replicas)
    backend = RemoteBackend(registry, max_recomputes=args.max_recomputes, replicas=replicas,
                            max_prefill_inflight=args.max_prefill_inflight or MAX_PREFILL_INFLIGHT)
    fronts = _Fronts(args, backend, config, [(worker_pb2_grpc.add_RegistryServicer_to_server, registry)],
                     cluster_token=token)
    supervisor = None
    if args.role is None:  # start the workers here
        address = f"127.0.0.1:{fronts.cluster_port}"
        specs = []
        roles = [("replica", "prefill", placement.prefill)] if replicas else \
            [("prefill", "prefill", placement.prefill), ("decode", "decode", placement.decode)]
        for role, flag, phase in roles:
            for i in range(phase.replicas):
                wid = f"{role}-{i}"
                argv = _worker_argv(args, role, wid, address) + [f"--{flag}-tp", str(phase.tp), f"--{flag}-pp", str(phase.pp)]
                argv += ["--mode", placement.mode]
                if args.warmup_shapes and phase.replicas > 1:  # the replicas split the compiling (warm_shapes' share)
                    argv += ["--warmup-share", f"{i}/{phase.replicas}"]
                argv += emulation.worker_argv() if emulation is not None else []
                specs.append(WorkerSpec(wid, argv, phase.tp * phase.pp))
        if args.gpus:
            for spec, gpus in zip(specs, assign_gpus([s.num_devices for s in specs], args.gpus)):
                spec.gpus = gpus
        supervisor = Supervisor(specs, restart=not args.no_restart, log_dir=args.log_dir)
    _ready(args)
    _wait_for_signal()
    if supervisor:
        supervisor.stop()
    fronts.close()
    backend.close()
    log_pauses(log)
    return 0


def run_worker(args: argparse.Namespace, placement, emulation=None) -> int:
    from serving.tls import cluster_tls
    from serving.validation import model_config
    from serving.worker import WorkerConfig, WorkerProcess

    if not args.router:
        raise SystemExit(f"--role {args.role} needs --router HOST:PORT")
    cluster_tls(args.tls_dir)  # a missing or unreadable --tls-dir exits here, before the weights load
    phase = placement.decode if args.role == "decode" else placement.prefill
    config = model_config(args.model)
    runner = None
    if emulation is None:
        _setup_jax(args)
        import jax.numpy as jnp

        from models.weights import DTYPES

        cache, sched = _cache_and_scheduler(args, config, jnp.dtype(DTYPES[args.dtype]).itemsize)
    else:  # no jax: nothing to compile or warm up
        try:
            runner = emulation.runner(phase, block_size=args.block_size, num_blocks=args.num_blocks)
        except ValueError as e:
            raise SystemExit(f"--emulate: {e}") from None
        cache, sched = runner.cache_config, _scheduler(args)
        args.no_warmup, args.warmup_shapes = True, False
    cfg = WorkerConfig(
        role=args.role, worker_id=args.worker_id or f"{args.role}-{os.getpid()}", router=args.router,
        model=args.model, dummy_weights=_dummy(args), dtype=args.dtype, seed=args.seed,
        attention_backend=args.attention_backend, tp=phase.tp, pp=phase.pp,
        cache=cache, scheduler=sched, host=args.host, port=args.port, advertise_host=args.advertise_host,
        lease_s=args.lease_seconds, max_lease_s=args.max_lease_seconds, chunk_bytes=args.kv_chunk_bytes, warmup=not args.no_warmup,
        exit_with_parent=args.exit_with_parent, step_log_dir=args.step_log, warmup_shapes=args.warmup_shapes,
        warmup_share=getattr(args, "warmup_share", (0, 1)), max_staged_bytes=args.kv_staging_mib << 20, cluster_token=_cluster_token(), tls_dir=args.tls_dir,
        mode=placement.mode if args.role == "replica" else "colocated",
    )
    worker = WorkerProcess(cfg, runner=runner)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.request_stop())
    _ready(args)  # the worker has warmed up
    worker.serve()
    log_pauses(log)
    return 0


def run(args: argparse.Namespace, placement, emulation=None) -> int:
    """`emulation`: the --emulate runner factory (dsjax/emulate.py), None on real devices."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    process_pauses()  # every collection of this process timed from here on (serving/gc_pauses.py)
    from serving.engine_loop import Outbox

    Outbox.stream_interval_s = max(0.0, getattr(args, "stream_interval_ms", 0.0)) / 1e3
    if args.role in ("prefill", "decode", "replica"):
        return run_worker(args, placement, emulation)
    if args.role == "router" or args.workers == "processes":
        return run_router(args, placement, emulation)
    if emulation is not None:
        return run_emulated(args, placement, emulation)
    return run_inprocess(args, placement)
