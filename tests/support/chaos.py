"""A chaos soak over real processes: `python -m dsjax.serve --workers processes` (tiny-llama with
dummy weights, two prefill and two decode workers, each its own OS process, restarted by the
launcher's supervisor when it dies) serves a client load while random workers are killed
(SIGKILL) or paused (SIGSTOP, then SIGCONT after a few seconds: longer than the registry's
heartbeat timeout, the router drops it and recomputes its requests; shorter, a stall).

    python -m tests.support.chaos --duration 300 --log-dir /tmp/chaos     # by hand, a long soak
    report = run_chaos(duration_s=60, log_dir=tmp_path); report.check()  # tests/serving/test_chaos.py

`ChaosReport.check` asserts what must hold whatever was hit, and when:
- every request either completed with exactly its max_tokens tokens, the same ones a clean run of
  its prompt gave (greedy: a recompute continues the stream, none lost or repeated), or failed
  with a clear status (UNAVAILABLE or DEADLINE_EXCEEDED, with a message);
- no KV block leaks: once chaos and load stop and every worker is back, every worker's blocks are
  all free and nothing is queued, held or running (Admin/Instances, the workers' own Stats);
- the server keeps serving: most requests under chaos completed, and a final batch all does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import threading
import time
from pathlib import Path

import grpc

from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from tests.support.serving import free_port, instances, launch_server, stop_server, wait_idle, wait_serving

CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")
MAX_TOKENS = 48
WORKERS = ("prefill-0", "prefill-1", "decode-0", "decode-1")
CLEAR = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclasses.dataclass
class Outcome:
    prompt: int  # index into the prompt pool
    max_tokens: int
    tokens: list[int]
    code: grpc.StatusCode  # OK when it completed
    details: str = ""
    finish: int = 0
    recomputes: int = 0


@dataclasses.dataclass
class ChaosReport:
    reference: list[list[int]]  # clean-run tokens of each prompt of the pool, MAX_TOKENS each
    outcomes: list[Outcome]
    actions: list[str]
    final: list[Outcome]
    idle: list  # Admin stats after the soak

    def summary(self) -> str:
        ok = [o for o in self.outcomes if o.code == grpc.StatusCode.OK]
        codes = sorted({o.code.name for o in self.outcomes if o.code != grpc.StatusCode.OK})
        return (f"{len(self.outcomes)} requests: {len(ok)} completed ({sum(o.recomputes for o in ok)} recomputes), "
                f"{len(self.outcomes) - len(ok)} failed {codes}; actions: {', '.join(self.actions)}")

    def check(self, min_completed: float = 0.5) -> None:
        for o in self.outcomes + self.final:
            if o.code == grpc.StatusCode.OK:
                assert o.finish == pb.LENGTH and len(o.tokens) == o.max_tokens, o
                assert o.tokens == self.reference[o.prompt][: o.max_tokens], ("tokens lost or repeated", o)
            else:
                assert o.code in CLEAR and o.details, ("unclear failure", o)
        ok = sum(o.code == grpc.StatusCode.OK for o in self.outcomes)
        assert ok >= min_completed * len(self.outcomes), self.summary()
        assert all(o.code == grpc.StatusCode.OK for o in self.final), ("the server stopped serving", self.final)
        assert sorted(s.worker_id for s in self.idle) == sorted(WORKERS)
        assert all(s.alive and s.free_blocks == s.num_blocks and not (s.held or s.running or s.waiting or s.pulling)
                   for s in self.idle), self.idle


def _prompts(n: int = 8) -> list[list[int]]:
    rng = random.Random(1)
    return [[256] + [rng.randrange(1, 500) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


def _request(target: str, prompt: list[int], index: int, max_tokens: int, timeout: float = 60.0) -> Outcome:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    out = Outcome(index, max_tokens, [], grpc.StatusCode.OK)
    with grpc.insecure_channel(target) as ch:
        try:
            for m in dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=timeout):
                out.tokens += m.token_ids
                out.finish, out.recomputes = m.finish_reason, m.breakdown.num_recomputes
        except grpc.RpcError as e:
            out.code, out.details = e.code(), e.details() or ""
    return out


def launch_cluster(log_dir: Path, port: int | None = None, extra: tuple[str, ...] = ()):
    """The router (and, by its supervisor, the four workers); -> (process, target)."""
    port = port or free_port()
    args = ["--workers", "processes", "--model", "tiny-llama", "--dummy-weights", "--port", str(port),
            "--metrics-port", "-1", "--http-port", "0", "--prefill-replicas", "2", "--decode-replicas", "2",
            "--num-blocks", "96", "--lease-seconds", "3", "--max-recomputes", "4", "--hung-worker-seconds", "20",
            "--compilation-cache", CACHE_DIR, "--log-dir", str(log_dir), "--log-level", "WARNING", *extra]
    proc = launch_server(args, log_dir / "router.log")
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, timeout=180, proc=proc)
        wait_workers(target, timeout=180)
    except BaseException:
        stop_server(proc)
        raise
    return proc, target


def wait_workers(target: str, timeout: float) -> list:
    """Until every worker is registered and answers (a killed one is restarted by the supervisor)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = instances(target)
        if sorted(s.worker_id for s in stats if s.alive) == sorted(WORKERS):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"workers did not all come back: {[(s.worker_id, s.alive) for s in stats]}")
        time.sleep(0.25)


class _Chaos(threading.Thread):
    """Hits one random worker at a time, waits for the cluster to be whole again, pauses, repeats."""

    def __init__(self, target: str, rng: random.Random, stop: threading.Event):
        super().__init__(name="chaos", daemon=True)
        self.target, self.rng, self.stop_event = target, rng, stop
        self.actions: list[str] = []
        self.stopped: set[int] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.wait(self.rng.uniform(1.0, 3.0)):
                victim = self.rng.choice([s for s in instances(self.target) if s.alive])
                if self.rng.random() < 0.5:
                    os.kill(victim.pid, signal.SIGKILL)
                    self.actions.append(f"kill {victim.worker_id}")
                else:
                    pause = self.rng.choice([self.rng.uniform(1.0, 3.0), self.rng.uniform(6.0, 9.0)])
                    os.kill(victim.pid, signal.SIGSTOP)
                    self.stopped.add(victim.pid)
                    self.stop_event.wait(pause)
                    os.kill(victim.pid, signal.SIGCONT)
                    self.stopped.discard(victim.pid)
                    self.actions.append(f"pause {victim.worker_id} {pause:.1f}s")
                wait_workers(self.target, timeout=120)
        except BaseException as e:  # reported by run_chaos
            self.error = e

    def resume_all(self) -> None:
        for pid in list(self.stopped):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def run_chaos(duration_s: float, log_dir: Path, *, seed: int = 0, clients: int = 6, target: str | None = None) -> ChaosReport:
    """The soak on a cluster launched here (or on `target`, already serving); see the module doc."""
    proc = None
    if target is None:
        proc, target = launch_cluster(log_dir)
    rng, stop = random.Random(seed), threading.Event()
    chaos = _Chaos(target, random.Random(seed + 1), stop)
    try:
        prompts = _prompts()
        reference = [_request(target, p, i, MAX_TOKENS).tokens for i, p in enumerate(prompts)]
        assert all(len(r) == MAX_TOKENS for r in reference), "the clean run failed"
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def client(r: random.Random) -> None:
            while not stop.is_set():
                i = r.randrange(len(prompts))
                o = _request(target, prompts[i], i, r.randrange(1, MAX_TOKENS + 1))
                with lock:
                    outcomes.append(o)

        threads = [threading.Thread(target=client, args=(random.Random(rng.random()),), daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        chaos.start()
        time.sleep(duration_s)
        stop.set()
        chaos.join(150)
        for t in threads:
            t.join(90)
        chaos.resume_all()
        if chaos.error is not None:
            raise chaos.error
        wait_workers(target, timeout=150)
        idle = wait_idle(target, timeout=30)
        final = [_request(target, p, i, MAX_TOKENS) for i, p in enumerate(prompts)]
        return ChaosReport(reference, outcomes, chaos.actions, final, idle)
    finally:
        stop.set()
        chaos.resume_all()
        if proc is not None:
            stop_server(proc, timeout=20)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--log-dir", default="/tmp/dsjax-chaos")
    args = p.parse_args()
    os.environ.setdefault("DSJAX_CLUSTER_TOKEN", "chaos-" + os.urandom(8).hex())
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    report = run_chaos(args.duration, log_dir, seed=args.seed, clients=args.clients)
    print(report.summary())
    report.check()
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
