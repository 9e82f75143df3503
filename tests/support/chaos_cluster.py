"""The processes of the chaos soak (tests/support/chaos.py) and the faults done to them.

`Cluster`: a router on fixed public and cluster ports and its prefill and decode workers, each a
`python -m dsjax.serve --role ...` process of this one; workers that die are started again (as the
launcher's supervisor does), and only the workers get tests/support/kv_faults on their PYTHONPATH
(corrupted KV chunks). `Monitor`: RSS of every process and the decode workers' checksum-failure
counters, sampled. `Faults`: a plan's scheduled kills, SIGSTOPs and router restart, and random
ones between them, one at a time.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from serving.supervisor import xla_flags_with_devices
from tests.support.rss import rss_mib
from tests.support.serving import REPO, free_port, instances, launch_server, stop_server, wait_serving

if TYPE_CHECKING:
    from tests.support.chaos import Plan

CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")
FAULTS = Path(__file__).resolve().parent / "kv_faults"  # the sitecustomize that corrupts KV chunks
COMMON = ["--model", "tiny-llama", "--dummy-weights", "--lease-seconds", "3", "--max-model-len", "128",
          "--compilation-cache", CACHE_DIR, "--log-level", "WARNING"]


class Cluster:
    """A router on fixed ports (public and cluster) and its workers, all processes of this one;
    workers that die are started again (`--exit-with-parent`: they go when this process does)."""

    def __init__(self, log_dir: Path, plan: Plan, corrupt_log: Path, arm: Path):
        self.log_dir, self.plan = log_dir, plan
        self.port = free_port()
        self.cluster_port = free_port()
        while self.cluster_port == self.port:
            self.cluster_port = free_port()
        self.target, self.admin = f"127.0.0.1:{self.port}", f"127.0.0.1:{self.cluster_port}"
        self.names = [f"prefill-{i}" for i in range(plan.prefill)] + [f"decode-{i}" for i in range(plan.decode)]
        env = dict(os.environ)
        env["XLA_FLAGS"] = xla_flags_with_devices(env.get("XLA_FLAGS", ""), 1)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS), str(REPO), env.get("PYTHONPATH")]))
        if plan.corrupt > 0:
            env.update(DSJAX_TEST_CORRUPT_KV=str(plan.corrupt), DSJAX_TEST_CORRUPT_KV_ARM=str(arm),
                       DSJAX_TEST_CORRUPT_KV_LOG=str(corrupt_log))
        self.worker_env = env
        self.router: subprocess.Popen | None = None
        self.router_starts = 0
        self.workers: dict[str, subprocess.Popen] = {}
        self.restarts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._supervise, name="chaos-supervisor", daemon=True)

    def start(self) -> None:
        self._start_router()
        for wid in self.names:
            self.workers[wid] = self._spawn(wid)
        self._watch.start()
        wait_serving(self.target, timeout=240, proc=self.router)
        self.wait_workers(240)

    def _start_router(self) -> None:
        self.router_starts += 1
        argv = ["--role", "router", "--port", str(self.port), "--cluster-port", str(self.cluster_port),
                "--metrics-port", "-1", "--http-port", "0", "--max-recomputes", "4", "--hung-worker-seconds", "20", *COMMON]
        self.router = launch_server(argv, self.log_dir / f"router-{self.router_starts}.log")

    def _spawn(self, wid: str) -> subprocess.Popen:
        role = wid.split("-")[0]
        argv = ["--role", role, "--worker-id", wid, "--router", self.admin, "--port", "0", "--num-blocks", "96",
                "--exit-with-parent", *COMMON]
        with open(self.log_dir / f"{wid}.log", "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "dsjax.serve", *argv], cwd=REPO, env=self.worker_env,
                                    stdout=out, stderr=subprocess.STDOUT)

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for wid, proc in list(self.workers.items()):
                if proc.poll() is not None and not self._stop.wait(1.0):
                    with self._lock:
                        self.workers[wid] = self._spawn(wid)
                        self.restarts += 1

    def pid(self, wid: str) -> int:
        with self._lock:
            return self.workers[wid].pid

    def processes(self) -> dict[str, int]:
        with self._lock:
            out = {wid: p.pid for wid, p in self.workers.items()}
        if self.router is not None:
            out["router"] = self.router.pid
        return out

    def wait_workers(self, timeout: float) -> list:
        """Until every worker is registered and answers (a killed one is restarted)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stats = instances(self.admin)
            except grpc.RpcError as e:
                stats = [e.code().name]
            else:
                if sorted(s.worker_id for s in stats if s.alive) == sorted(self.names):
                    return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"workers did not all come back: {stats}")
            time.sleep(0.25)

    def restart_router(self) -> float:
        """SIGKILL the router, start it again on its ports; seconds until it serves with every worker."""
        t0 = time.monotonic()
        self.router.kill()
        self.router.wait(10)
        self._start_router()
        wait_serving(self.target, timeout=120, proc=self.router)
        self.wait_workers(60)
        return time.monotonic() - t0

    def stop(self) -> None:
        self._stop.set()
        self._watch.join(5)
        for proc in [*self.workers.values(), self.router]:
            if proc is not None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                stop_server(proc, timeout=20)


class Monitor(threading.Thread):
    """Every `every_s`: RSS of the router and each worker; the decode workers' checksum-failure
    counters (per process: a killed worker's count is kept as last seen)."""

    def __init__(self, cluster: Cluster, t0: float, stop: threading.Event, every_s: float = 2.0):
        super().__init__(name="chaos-monitor", daemon=True)
        self.cluster, self.t0, self.stop_event, self.every_s = cluster, t0, stop, every_s
        self.rss: list[tuple[float, dict[str, tuple[int, float]]]] = []
        self.caught: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def poll_counters(self) -> None:
        try:
            stats = instances(self.cluster.admin)
        except grpc.RpcError:
            return
        with self._lock:
            for s in stats:
                key = (s.worker_id, s.pid)
                self.caught[key] = max(self.caught.get(key, 0), s.kv_checksum_failures)

    def run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            procs = self.cluster.processes()
            self.rss.append((time.monotonic() - self.t0, {k: (p, rss_mib(p)) for k, p in procs.items()}))
            self.poll_counters()


class Faults(threading.Thread):
    """The plan's scheduled faults, in order, and (random_chaos) random kills and pauses of any
    worker between them; one fault at a time, each followed by waiting for the cluster to be whole."""

    def __init__(self, cluster: Cluster, monitor: Monitor, plan: Plan, t0: float, stop: threading.Event):
        super().__init__(name="chaos", daemon=True)
        self.cluster, self.monitor, self.plan, self.t0, self.stop_event = cluster, monitor, plan, t0, stop
        self.rng = random.Random(plan.seed + 1)
        self.actions: list[str] = []
        self.stopped: set[int] = set()
        self.router_down_s = 0.0
        self.router_killed_at: list[float] = []  # seconds into the soak
        self.error: BaseException | None = None
        self.schedule = sorted((t, what) for t, what in ((plan.kill_decode_at, "kill"), (plan.stop_decode_at, "stop"),
                                                         (plan.restart_router_at, "router")) if t is not None)
        self.scheduled_done = threading.Event()
        if not self.schedule:
            self.scheduled_done.set()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        try:
            while not (self.stop_event.is_set() and self.scheduled_done.is_set()):
                if self.schedule and self.now() >= self.schedule[0][0]:
                    self._scheduled(self.schedule.pop(0)[1])
                    if not self.schedule:
                        self.scheduled_done.set()
                elif self.plan.random_chaos and not self.stop_event.is_set():
                    gap = self.rng.uniform(2.0, 6.0)
                    if self.schedule:
                        gap = min(gap, self.schedule[0][0] - self.now())
                    if gap > 0 and self.stop_event.wait(gap):
                        continue
                    if not self.schedule or self.now() < self.schedule[0][0]:
                        self._random()
                else:
                    self.stop_event.wait(min(0.2, max(0.0, self.schedule[0][0] - self.now())) if self.schedule else 0.2)
        except BaseException as e:  # reported by run_chaos
            self.error = e
            self.scheduled_done.set()

    def _log(self, what: str) -> None:
        self.actions.append(f"{what} @{self.now():.0f}s")

    def _kill(self, wid: str) -> None:
        self.monitor.poll_counters()  # keep its checksum count
        os.kill(self.cluster.pid(wid), signal.SIGKILL)
        self._log(f"kill {wid}")
        self.cluster.wait_workers(180)

    def _pause(self, wid: str, seconds: float) -> None:
        pid = self.cluster.pid(wid)
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(pid)
        self._log(f"pause {wid} {seconds:.1f}s")
        time.sleep(seconds)  # not cut short by the end of the soak
        os.kill(pid, signal.SIGCONT)
        self.stopped.discard(pid)
        self.cluster.wait_workers(120)

    def _scheduled(self, what: str) -> None:
        if what == "kill":
            self._kill("decode-0")
        elif what == "stop":
            self._pause("decode-1", self.plan.stop_decode_s)
        else:
            self._log("restart router")
            self.router_killed_at.append(self.now())
            down = self.cluster.restart_router()
            self.router_down_s += down
            self.actions[-1] += f" (serving again with every worker after {down:.1f}s)"

    def _random(self) -> None:
        wid = self.rng.choice(self.cluster.names)
        kills = self.plan.kills_until_s is None or self.now() < self.plan.kills_until_s
        if kills and self.rng.random() < 0.5:
            self._kill(wid)
        else:
            self._pause(wid, self.rng.choice([self.rng.uniform(1.0, 3.0), self.rng.uniform(6.0, 9.0)]))

    def resume_all(self) -> None:
        for pid in list(self.stopped):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
