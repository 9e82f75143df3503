"""Resident memory of a server and its worker processes under a client load (Linux /proc).

    samples = measure_rss(proc.pid, target, seconds=180, every_s=10)   # [(t, {pid: MiB}), ...]
"""

from __future__ import annotations

import os
import random
import threading
import time

import grpc

from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc


def rss_mib(pid: int) -> float:
    """VmRSS of one process in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class Load:
    """`clients` threads streaming random prompts (3-200 tokens, 1-64 output tokens, sampled) to
    `target` until `stop()`; counts completions and failures."""

    def __init__(self, target: str, clients: int = 6, seed: int = 0, max_prompt: int = 200):
        self.target, self.max_prompt = target, max_prompt
        self.done = self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(random.Random(seed + i),), daemon=True)
                         for i in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, r: random.Random) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub = dsjax_pb2_grpc.GenerationStub(ch)
            while not self._stop.is_set():
                n = r.randrange(3, self.max_prompt)
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[r.randrange(1, 500) for _ in range(n)]),
                                         sampling=pb.SamplingParams(max_tokens=r.randrange(1, 64), temperature=0.8,
                                                                    ignore_eos=True))
                try:
                    for _ in stub.Generate(req, timeout=120):
                        pass
                    ok = True
                except grpc.RpcError:
                    ok = False
                with self._lock:
                    self.done += ok
                    self.failed += not ok

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(150)


def measure_rss(pid: int, seconds: float, every_s: float = 10.0) -> list[tuple[float, dict[int, float]]]:
    """RSS of `pid`'s process tree every `every_s` for `seconds`."""
    t0, out = time.monotonic(), []
    while time.monotonic() - t0 < seconds:
        time.sleep(every_s)
        out.append((time.monotonic() - t0, {p: rss_mib(p) for p in process_tree(pid)}))
    return out
