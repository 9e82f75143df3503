"""Worker processes started by the launcher (`--workers processes`), restarted when they die.

Each worker is `python -m dsjax.serve --role ROLE ...` with its own environment: on a CPU host
`XLA_FLAGS=--xla_force_host_platform_device_count=tp*pp` gives it that many devices for its mesh
(set before it imports jax; other XLA flags of the parent are kept); on a GPU host, `gpus` gives
it its own `CUDA_VISIBLE_DEVICES`. A worker that exits is
started again after `restart_delay_s` with the same worker_id, and rejoins the router by
registering; workers exit on their own when the launcher is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)
_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def assign_gpus(counts: list[int], num_gpus: int) -> list[tuple[int, ...]]:
    """Disjoint GPU id ranges, in order, for workers needing `counts` devices each."""
    if sum(counts) > num_gpus:
        raise ValueError(f"workers need {sum(counts)} GPUs ({counts}), the host has {num_gpus}")
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [tuple(range(a, a + n)) for a, n in zip(starts, counts)]


def xla_flags_with_devices(flags: str, count: int) -> str:
    """`flags` with the host device count set to `count` (any previous count replaced)."""
    return " ".join([_COUNT_FLAG.sub("", flags).strip(), f"--xla_force_host_platform_device_count={count}"]).strip()


@dataclasses.dataclass
class WorkerSpec:
    worker_id: str
    argv: list[str]  # arguments after `python -m dsjax.serve`
    num_devices: int
    gpus: tuple[int, ...] | None = None  # CUDA_VISIBLE_DEVICES for this worker


@dataclasses.dataclass
class _Running:
    spec: WorkerSpec
    proc: subprocess.Popen
    restarts: int = 0
    reported: bool = False


class Supervisor:
    def __init__(self, specs: list[WorkerSpec], *, restart: bool = True, restart_delay_s: float = 1.0, log_dir: str | None = None):
        self.restart = restart
        self.restart_delay_s = restart_delay_s
        self.log_dir = log_dir
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = {s.worker_id: _Running(s, self._spawn(s)) for s in specs}
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, spec: WorkerSpec) -> subprocess.Popen:
        env = dict(os.environ)
        env["XLA_FLAGS"] = xla_flags_with_devices(env.get("XLA_FLAGS", ""), spec.num_devices)
        if spec.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.gpus))
        out = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"{spec.worker_id}.log"), "ab")
        proc = subprocess.Popen([sys.executable, "-m", "dsjax.serve", *spec.argv], env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        if out is not None:
            out.close()
        log.info("started worker %s (pid %d)", spec.worker_id, proc.pid)
        return proc

    def pids(self) -> dict[str, int]:
        with self._lock:
            return {wid: w.proc.pid for wid, w in self._workers.items()}

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                dead = [w for w in self._workers.values() if w.proc.poll() is not None and not w.reported]
            for w in dead:
                if self._stop.is_set():
                    return
                log.warning("worker %s (pid %d) exited with %s", w.spec.worker_id, w.proc.pid, w.proc.returncode)
                w.reported = True
                if not self.restart:
                    continue
                time.sleep(self.restart_delay_s)
                with self._lock:
                    if self._stop.is_set():
                        return
                    w.proc, w.restarts, w.reported = self._spawn(w.spec), w.restarts + 1, False

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            procs = [w.proc for w in self._workers.values()]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
