"""Start the three systems of the headline experiment as separate server processes, one core each.

"A device" is a CPU core: every process that runs a model is pinned to its own core with
`taskset -c` (so XLA sizes its thread pools to that one core), the same model and engine settings
everywhere.

    disaggregated  router (unpinned)  +  prefill worker on core 0  +  decode worker on core 1
                   (python -m dsjax.serve --role router / --role prefill / --role decode)
    colocated      two servers, one per core, each router + one prefill-first engine
    chunked        two servers, one per core, each router + one chunked-prefill engine
                   (python -m dsjax.serve --workers inprocess --mode colocated|chunked)

The launcher runs colocated and chunked only in process (`--workers processes` is disaggregated
only), so a baseline replica is a whole server on its core and the benchmark client spreads requests
over the two replicas (least in-flight requests, `loadgen`), standing in for the router. Each
baseline router therefore shares its core with its engine, while the disaggregated router floats
over both cores; either way the routers run on the same two cores as the models.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsjax.bench.capacity_stats import descendants, process_cpu_s
from serving.cluster_auth import TOKEN_ENV
from serving.proto import GENERATION_SERVICE

SYSTEMS = ("disaggregated", "colocated", "chunked")


def admin_instances(target: str, token: str, timeout_s: float = 10.0) -> list:
    """Every instance's stats from a dsjax server's `Admin/Instances` (a cluster-internal call:
    it carries the cluster token)."""
    from serving.cluster_auth import METADATA_KEY
    from serving.proto.dsjax.v1 import worker_pb2 as wpb
    from serving.proto.dsjax.v1 import worker_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        return list(worker_pb2_grpc.AdminStub(ch).Instances(wpb.InstancesRequest(), metadata=[(METADATA_KEY, token)],
                                                            timeout=timeout_s).instances)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """What every system is started with (identical across systems)."""

    model: str = "small-llama"
    dtype: str = "float32"
    block_size: int = 16
    max_num_seqs: int = 32
    max_prefill_tokens: int = 256  # L_m; see docs/results.md for why not the engine's 1024
    num_blocks: int | None = None
    max_model_len: int | None = None  # None: the model's context (compare sets it from the workload)
    xla_flags: str = ""  # appended to XLA_FLAGS of every server process
    pin: bool = True  # taskset -c one core per model process
    cores: tuple[int, ...] = (0, 1)
    compilation_cache: str = os.path.expanduser("~/.cache/dsjax/jax-serve")
    ready_timeout_s: float = 900.0
    log_level: str = "WARNING"
    # Every model process times its served steps into <log_dir>/steps-<system>/ (serving/step_log.py):
    # the experiment fits the simulator's served profile on the warm-up's steps.
    step_logs: bool = True
    # Compile every reachable program shape before serving (dsjax/runtime/warmup.py, --warmup-shapes): no
    # first-compilation stall inside a measured run.
    warmup_shapes: bool = True

    def engine_args(self) -> list[str]:
        args = ["--model", self.model, "--dummy-weights", "--dtype", self.dtype, "--block-size", str(self.block_size),
                "--max-num-seqs", str(self.max_num_seqs), "--max-prefill-tokens", str(self.max_prefill_tokens),
                "--compilation-cache", self.compilation_cache, "--log-level", self.log_level]
        if self.num_blocks:
            args += ["--num-blocks", str(self.num_blocks)]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        return args

    def model_args(self) -> list[str]:
        """engine_args plus the flags only model processes take."""
        return self.engine_args() + (["--warmup-shapes"] if self.warmup_shapes else [])


def free_port() -> int:
    """A TCP port free on loopback right now (the servers here listen on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, timeout: float, proc: subprocess.Popen | None = None,
                 check: Callable[[], None] | None = None, poll_s: float = 0.2) -> float:
    """Seconds until `target` reports SERVING for the Generation service (TimeoutError otherwise).
    Fails early when `proc` exits, or when `check` (called every poll) raises."""
    start = time.monotonic()
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() - start < timeout:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before serving")
            if check is not None:
                check()
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=GENERATION_SERVICE), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(poll_s)
    raise TimeoutError(f"{target} did not report SERVING within {timeout:.0f}s")


def launch_server(args: list[str], log_path: str | os.PathLike | None = None, env: dict | None = None) -> subprocess.Popen:
    """`python -m dsjax.serve ARGS` from the repository root (its output to `log_path` or nowhere)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_repo_root(), env.get("PYTHONPATH")]))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "dsjax.serve", *args], cwd=_repo_root(), env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        if log_path:
            out.close()


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclasses.dataclass
class ServerProcess:
    name: str  # e.g. "prefill", "replica-0"
    proc: subprocess.Popen
    core: int | None
    log_path: Path

    def cpu_seconds(self) -> float | None:
        """utime + stime of the process (all its threads), from /proc; None once it is gone."""
        return process_cpu_s(self.proc.pid)

    def descendants_cpu_seconds(self) -> float | None:
        """utime + stime of the live processes this one started (a launcher's worker processes);
        None once it is gone or while it has none."""
        kids = descendants(self.proc.pid)[1:]  # a gone process has no children left in /proc
        return sum(process_cpu_s(pid) or 0.0 for pid in kids) if kids else None

    def affinity(self) -> list[int] | None:
        try:
            return sorted(os.sched_getaffinity(self.proc.pid))
        except OSError:
            return None

    def num_threads(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/task"))
        except OSError:
            return None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class LaunchedSystem:
    """Processes of one system; `targets` are the gRPC addresses the client sends to."""

    def __init__(self, name: str, num_devices: int):
        self.name = name
        self.num_devices = num_devices
        self.processes: list[ServerProcess] = []
        self.targets: list[str] = []
        self.step_log_dir: Path | None = None  # where the model processes write their step logs
        self.cluster_token = secrets.token_urlsafe(32)  # the router and workers of this system share it

    def start_process(self, name: str, argv: list[str], *, core: int | None, options: ServerOptions, log_dir: Path) -> None:
        env = dict(os.environ)
        env[TOKEN_ENV] = self.cluster_token
        if options.xla_flags:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {options.xla_flags}".strip()
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "dsjax.serve", *argv]
        if core is not None and options.pin:
            if shutil.which("taskset") is None:
                raise RuntimeError("taskset (util-linux) is needed to pin servers to cores; pass pin=False to skip")
            cmd = ["taskset", "-c", str(core), *cmd]
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{self.name}-{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=_repo_root())
        self.processes.append(ServerProcess(name=name, proc=proc, core=core if options.pin else None, log_path=log_path))

    def wait_ready(self, timeout_s: float) -> float:
        """Blocks until every target reports SERVING on the health service; returns the seconds taken."""
        t0 = time.monotonic()
        for target in self.targets:
            try:
                wait_serving(target, max(0.0, timeout_s - (time.monotonic() - t0)), check=self._check_alive, poll_s=0.5)
            except TimeoutError:
                self.stop()
                raise TimeoutError(f"{self.name}: {target} not SERVING after {timeout_s:.0f} s") from None
        return time.monotonic() - t0

    def _check_alive(self) -> None:
        for p in self.processes:
            if p.proc.poll() is not None:
                tails = "\n".join(f"--- {q.name} ({q.log_path}) ---\n{q.log_tail()}" for q in self.processes)
                self.stop()
                raise RuntimeError(f"{self.name}: {p.name} exited with {p.proc.returncode}\n{tails}")

    def cpu_seconds(self) -> dict[str, float | None]:
        """CPU seconds of each process started here and, under "<name> worker processes", of the
        processes it started (so a launcher's workers are not counted as other processes)."""
        out: dict[str, float | None] = {}
        for p in self.processes:
            out[p.name] = p.cpu_seconds()
            if (workers := p.descendants_cpu_seconds()) is not None:
                out[f"{p.name} worker processes"] = workers
        return out

    def describe(self) -> list[dict]:
        return [{"name": p.name, "pid": p.proc.pid, "core": p.core, "affinity": p.affinity(), "threads": p.num_threads(),
                 "log": str(p.log_path)} for p in self.processes]

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every process this object started (by pid), then SIGKILL the ones still alive."""
        for p in reversed(self.processes):
            if p.proc.poll() is None:
                p.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for p in self.processes:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()

    def __enter__(self) -> LaunchedSystem:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def launch_system(name: str, options: ServerOptions, log_dir: str | Path) -> LaunchedSystem:
    """Starts `name` (one of SYSTEMS) on `options.cores` (two cores) and waits until it serves."""
    if name not in SYSTEMS:
        raise ValueError(f"system {name!r} must be one of {SYSTEMS}")
    if len(options.cores) != 2:
        raise ValueError(f"cores={options.cores} must name two cores (one per device)")
    log_dir = Path(log_dir)
    system = LaunchedSystem(name, num_devices=2)
    common = options.model_args()
    if options.step_logs:
        system.step_log_dir = log_dir / f"steps-{name}"
        shutil.rmtree(system.step_log_dir, ignore_errors=True)  # a previous run's steps
        common += ["--step-log", str(system.step_log_dir)]
    if name == "disaggregated":
        port = free_port()
        router = f"127.0.0.1:{port}"
        system.start_process("router", ["--role", "router", "--mode", "disaggregated", "--port", str(port),
                                        "--host", "127.0.0.1", "--metrics-port", "-1", "--http-port", "0", *options.engine_args()],
                             core=None, options=options, log_dir=log_dir)  # no engine here: no step log
        for role, core in (("prefill", options.cores[0]), ("decode", options.cores[1])):
            system.start_process(role, ["--role", role, "--router", router, "--worker-id", f"{role}-0", "--port", "0",
                                        "--host", "127.0.0.1", "--mode", "disaggregated", "--exit-with-parent", *common],
                                 core=core, options=options, log_dir=log_dir)
        system.targets = [router]
    else:
        for i, core in enumerate(options.cores):
            port = free_port()
            # the replicas split the first compilation of their shared programs (warm_shapes' share)
            share = ["--warmup-share", f"{i}/{len(options.cores)}"] if options.warmup_shapes else []
            system.start_process(f"replica-{i}", ["--workers", "inprocess", "--mode", name, "--port", str(port),
                                                  "--host", "127.0.0.1", "--metrics-port", "-1", "--http-port", "0",
                                                  *common, *share],
                                 core=core, options=options, log_dir=log_dir)
            system.targets.append(f"127.0.0.1:{port}")
    try:
        system.wait_ready(options.ready_timeout_s)
    except BaseException:
        system.stop()
        raise
    return system
