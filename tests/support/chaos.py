"""A chaos soak over real processes: a router (`python -m dsjax.serve --role router`) and two
prefill and two decode workers (`--role prefill|decode`, tiny-llama with dummy weights), each its
own OS process as on separate hosts, the workers restarted here when they die (as the launcher's
supervisor does for `--workers processes`, whose router lives in the launcher's process and so
cannot be restarted alone; the processes and the faults: tests/support/chaos_cluster.py). Clients
stream greedy requests while, on a schedule:

- a decode worker is SIGKILLed (restarted; it rejoins), another SIGSTOPped for 20 s (7 s in the
  quick soak: past the 5 s heartbeat timeout either way, so it is dropped, its requests are
  recomputed on the other, and after SIGCONT it registers again), and the router is SIGKILLed and
  started again on its ports (the same worker processes rejoin it; requests in flight through it
  end with UNAVAILABLE);
- the long soak adds random kills (until `kills_until_s`) and pauses of any worker in between;
- the prefill workers corrupt a fraction of the KV chunks they send (one bit flipped, checksum
  left alone: tests/support/kv_faults/sitecustomize.py, on the workers' PYTHONPATH only), which
  the decode workers must refuse and count (`InstanceStats.kv_checksum_failures`);
- clients abort some requests mid-stream (cancel after a delay or after some tokens), give some a
  tight deadline, and read some slowly (a pause after every message).

    python -m tests.support.chaos --long --log-dir /tmp/chaos     # by hand: the 8-minute soak
    report = run_chaos(quick_plan(), tmp_path); report.check()     # tests/serving/test_chaos.py

`ChaosReport.check` asserts, whatever was hit and when:
- every request's tokens are a prefix of the clean run's tokens for its prompt (greedy: a
  recompute continues the stream, none lost, repeated or decoded from corrupted KV); one that
  completed has exactly its max_tokens of them; one that did not ended with a clear status:
  CANCELLED only if the client aborted it, DEADLINE_EXCEEDED only if it had a tight deadline, or
  UNAVAILABLE with a message (the router restart); nothing else;
- no stream outlived its deadline by more than `GRACE_S`, and none without a tight deadline hit
  its (generous) one: nothing hung;
- at least 99% (quick: 98%) of the requests neither aborted nor given a tight deadline completed;
- corrupted chunks were injected and the decode workers caught them (never more than injected);
- no KV block leaks: once chaos and load stop and every worker is back, every worker has all its
  blocks free and nothing queued, held, pulling or running (Admin/Instances); a final batch of
  every prompt completes with the clean run's tokens;
- the long soak: RSS of the router and the workers together grew < 10% from five minutes in to
  the end (the same processes: no kill or restart after `kills_until_s`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import threading
import time
from pathlib import Path

import grpc

from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from tests.support.chaos_cluster import Cluster, Faults, Monitor
from tests.support.serving import wait_idle

MAX_TOKENS = 48
GRACE_S = 2.0  # how far past its deadline a stream may end (a slow reader notices at its next read)
CLIENT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                  ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclasses.dataclass(frozen=True)
class Plan:
    duration_s: float
    clients: int = 6
    seed: int = 0
    prefill: int = 2
    decode: int = 2
    kill_decode_at: float | None = 5.0  # seconds into the soak: SIGKILL decode-0
    stop_decode_at: float | None = 20.0  # SIGSTOP decode-1 for stop_decode_s, then SIGCONT
    stop_decode_s: float = 20.0
    restart_router_at: float | None = 35.0  # SIGKILL the router and start it again on its ports
    random_chaos: bool = False  # random kills and pauses of any worker between the scheduled events
    kills_until_s: float | None = None  # random chaos kills no worker after this, only pauses (None: never stops)
    corrupt: float = 0.03  # fraction of KV chunks corrupted on the way out of the prefill workers
    abort: float = 0.08  # fraction of requests the client cancels mid-stream
    tight: float = 0.08  # ... given a tight deadline (0.1-1.5 s)
    slow: float = 0.08  # ... read slowly (20-100 ms after each message)
    timeout_s: float = 60.0  # everyone else's deadline: generous, so hitting it means a hang
    rss_after_s: float | None = None  # check RSS growth from here to the end (< 10%)
    min_requests: int = 0
    min_completed: float = 0.99


def quick_plan() -> Plan:
    """The default-run soak: 40 s, each kind of fault once."""
    # ~500 requests, so each of the <= 4 in flight through the killed router weighs 0.2%: 98%, not 99%
    return Plan(duration_s=40.0, clients=4, seed=0, kill_decode_at=3.0, stop_decode_at=16.0, stop_decode_s=7.0,
                restart_router_at=30.0, min_completed=0.98)


def long_plan() -> Plan:
    """The `slow` soak: 8 minutes, >= 2,000 requests; RSS checked over the last three."""
    return Plan(duration_s=480.0, clients=6, seed=1, kill_decode_at=20.0, stop_decode_at=70.0, stop_decode_s=20.0,
                restart_router_at=140.0, random_chaos=True, kills_until_s=270.0, rss_after_s=300.0,
                min_requests=2000)


@dataclasses.dataclass
class Outcome:
    prompt: int  # index into the prompt pool
    max_tokens: int
    timeout: float
    tight: bool = False  # a deliberately tight deadline
    abort_s: float | None = None  # the client cancels it this long after sending it
    abort_tokens: int | None = None  # ... or once it has this many tokens
    slow_s: float = 0.0  # the client's pause after each message
    tokens: list[int] = dataclasses.field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    finish: int = 0
    recomputes: int = 0
    elapsed: float = 0.0
    started: float = 0.0  # seconds into the soak

    @property
    def deliberate(self) -> bool:
        """Aborted or under a tight deadline on purpose: not counted in the completion rate."""
        return self.aborted or self.tight

    @property
    def aborted(self) -> bool:
        return self.abort_s is not None or self.abort_tokens is not None


@dataclasses.dataclass
class ChaosReport:
    plan: Plan
    reference: list[list[int]]  # clean-run tokens of each prompt of the pool, MAX_TOKENS each
    outcomes: list[Outcome]
    actions: list[str]
    final: list[Outcome]
    idle: list  # Admin stats after the soak
    injected: int  # KV chunks corrupted by the prefill workers
    caught: int  # KV pulls the decode workers refused for a bad checksum
    rss: list[tuple[float, dict[str, tuple[int, float]]]]  # (seconds into the soak, {process: (pid, MiB)})
    router_down_s: float = 0.0
    router_killed_at: list[float] = dataclasses.field(default_factory=list)

    def in_flight_at_router_kill(self) -> list[Outcome]:
        return [o for o in self.outcomes for t in self.router_killed_at if o.started < t < o.started + o.elapsed]

    def rss_total(self, start: float, end: float) -> tuple[float, set[tuple[str, int]]]:
        """Median total RSS (MiB) of the samples in [start, end], and the processes they saw."""
        window = [s for t, s in self.rss if start <= t <= end]
        assert window, f"no RSS sample in [{start:.0f}, {end:.0f}] s"
        return statistics.median(sum(m for _, m in s.values()) for s in window), {(k, p) for s in window for k, (p, _) in s.items()}

    def rss_growth(self) -> tuple[float, float]:
        """(MiB at `rss_after_s` (first 30 s after it), MiB at the end (last 30 s))."""
        at = self.plan.rss_after_s or 0.0
        end = self.rss[-1][0]
        return self.rss_total(at, at + 30.0)[0], self.rss_total(end - 30.0, end)[0]

    def figures(self) -> dict:
        o = self.outcomes
        counted = [x for x in o if not x.deliberate]
        ok = [x for x in o if x.code == grpc.StatusCode.OK]
        codes: dict[str, int] = {}
        for x in o:
            if x.code != grpc.StatusCode.OK:
                codes[x.code.name] = codes.get(x.code.name, 0) + 1
        at, end = self.rss_growth() if self.rss else (0.0, 0.0)
        return dict(
            requests=len(o), completed=len(ok),
            completed_pct=100.0 * sum(x.code == grpc.StatusCode.OK for x in counted) / max(1, len(counted)),
            counted=len(counted), aborted=sum(x.aborted for x in o),
            aborted_cancelled=sum(x.aborted and x.code == grpc.StatusCode.CANCELLED for x in o),
            tight=sum(x.tight for x in o), deadline_exceeded=codes.get("DEADLINE_EXCEEDED", 0),
            slow=sum(x.slow_s > 0 for x in o), codes=codes,
            recomputes=sum(x.recomputes for x in ok), injected=self.injected, caught=self.caught,
            max_over_deadline_s=max((x.elapsed - x.timeout for x in o), default=0.0),
            rss_start=self.rss_total(0.0, 30.0)[0] if self.rss else 0.0, rss_at=at, rss_end=end,
            router_down_s=self.router_down_s, in_flight_at_router_kill=len(self.in_flight_at_router_kill()),
            failed_at_router_kill=sum(o.code == grpc.StatusCode.UNAVAILABLE for o in self.in_flight_at_router_kill()),
            leaked_blocks=sum(s.num_blocks - s.free_blocks for s in self.idle),
        )

    def summary(self) -> str:
        f = self.figures()
        return (f"{f['requests']} requests: {f['completed']} completed, {f['completed_pct']:.2f}% of the {f['counted']} "
                f"neither aborted nor tightly timed ({f['recomputes']} recomputes); {f['aborted']} aborted by the client "
                f"({f['aborted_cancelled']} cancelled mid-stream, the rest done first), {f['tight']} tight deadlines "
                f"({f['deadline_exceeded']} DEADLINE_EXCEEDED), {f['slow']} slow readers; statuses {f['codes']}; "
                f"latest end past a deadline {f['max_over_deadline_s']:+.2f}s; KV chunks corrupted {f['injected']}, "
                f"refused by checksum {f['caught']}; router down {f['router_down_s']:.1f}s ({f['in_flight_at_router_kill']} "
                f"requests in flight when it was killed, {f['failed_at_router_kill']} of them UNAVAILABLE); RSS (MiB, all processes) "
                f"start {f['rss_start']:.0f}, "
                + (f"at {self.plan.rss_after_s:.0f}s {f['rss_at']:.0f}, " if self.plan.rss_after_s is not None else "")
                + f"end {f['rss_end']:.0f}; "
                f"blocks in use after: {f['leaked_blocks']}; actions: {', '.join(self.actions)}")

    def check(self) -> None:
        plan = self.plan
        for o in self.outcomes + self.final:
            ref = self.reference[o.prompt]
            assert len(o.tokens) <= o.max_tokens and o.tokens == ref[: len(o.tokens)], ("tokens lost, repeated or wrong", o)
            assert o.elapsed <= o.timeout + GRACE_S, ("a stream outlived its deadline", o)
            if o.code == grpc.StatusCode.OK:
                assert o.finish == pb.LENGTH and len(o.tokens) == o.max_tokens, o
            elif o.code == grpc.StatusCode.CANCELLED:
                assert o.aborted, ("cancelled, not by its client", o)
            elif o.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                assert o.tight, ("a stream hung until its deadline", o)
            else:
                assert o.code == grpc.StatusCode.UNAVAILABLE and o.details, ("unclear failure", o)
        f = self.figures()
        assert f["requests"] >= plan.min_requests, self.summary()
        assert f["completed_pct"] >= 100 * plan.min_completed, self.summary()
        assert all(o.code == grpc.StatusCode.OK for o in self.final), ("the server stopped serving", self.final)
        for what, at in (("kill decode-0", plan.kill_decode_at), ("pause decode-1", plan.stop_decode_at),
                         ("restart router", plan.restart_router_at)):
            assert at is None or any(a.startswith(what) for a in self.actions), (f"{what} never happened", self.actions)
        if plan.corrupt > 0:
            assert 0 < self.caught <= self.injected, ("corrupted KV chunks injected, refused", self.injected, self.caught)
        names = [f"prefill-{i}" for i in range(plan.prefill)] + [f"decode-{i}" for i in range(plan.decode)]
        assert sorted(s.worker_id for s in self.idle) == sorted(names)
        assert all(s.alive and s.free_blocks == s.num_blocks and not (s.held or s.running or s.waiting or s.pulling)
                   for s in self.idle), self.idle
        if plan.rss_after_s is not None:
            end = self.rss[-1][0]
            assert end >= plan.rss_after_s + 120, f"the soak ended {end:.0f}s in: too soon to compare RSS"
            at, procs_at = self.rss_total(plan.rss_after_s, plan.rss_after_s + 30)
            last, procs_end = self.rss_total(end - 30, end)
            assert procs_at == procs_end, ("processes restarted in the RSS window", procs_at, procs_end)
            assert last < 1.10 * at, f"RSS grew {100 * (last / at - 1):.1f}% from {at:.0f} to {last:.0f} MiB"


# ---- the load ----------------------------------------------------------------------------------
def _prompts(n: int = 8) -> list[list[int]]:
    rng = random.Random(1)
    return [[256] + [rng.randrange(1, 500) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


def _request(target: str, prompt: list[int], o: Outcome, t0: float = 0.0) -> Outcome:
    """Stream one request as `o` says (deadline, abort, slow reading), filling in its outcome."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                             sampling=pb.SamplingParams(max_tokens=o.max_tokens, temperature=0.0, ignore_eos=True))
    start = time.monotonic()
    o.started = start - t0
    timer = None
    with grpc.insecure_channel(target, options=CLIENT_OPTIONS) as ch:
        # wait_for_ready: a call made while the router restarts waits for it (within its deadline)
        call = dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=o.timeout, wait_for_ready=True)
        if o.abort_s is not None:
            timer = threading.Timer(o.abort_s, call.cancel)
            timer.start()
        try:
            for m in call:
                o.tokens += m.token_ids
                o.finish, o.recomputes = m.finish_reason, m.breakdown.num_recomputes
                if o.abort_tokens is not None and len(o.tokens) >= o.abort_tokens:
                    call.cancel()
                if o.slow_s:
                    time.sleep(o.slow_s)
        except grpc.RpcError as e:
            o.code, o.details = e.code(), e.details() or ""
        finally:
            if timer is not None:
                timer.cancel()
    o.elapsed = time.monotonic() - start
    return o


def _draw(r: random.Random, plan: Plan, n_prompts: int) -> Outcome:
    o = Outcome(r.randrange(n_prompts), r.randrange(1, MAX_TOKENS + 1), plan.timeout_s)
    if r.random() < plan.tight:
        o.timeout, o.tight = round(r.uniform(0.1, 1.5), 3), True
    if r.random() < plan.abort:
        if r.random() < 0.5 or o.max_tokens < 2:
            o.abort_s = r.uniform(0.0, 0.5)
        else:
            o.abort_tokens = r.randrange(1, o.max_tokens)
    if r.random() < plan.slow:
        o.slow_s = r.uniform(0.02, 0.1)
    return o


def run_chaos(plan: Plan, log_dir: Path) -> ChaosReport:
    """The soak (see the module doc) on a cluster started here, with its logs in `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    corrupt_log, arm = log_dir / "corrupted-chunks.txt", log_dir / "corrupt-kv.armed"
    arm.unlink(missing_ok=True)
    corrupt_log.unlink(missing_ok=True)
    cluster = Cluster(log_dir, plan, corrupt_log, arm)
    stop, stop_monitor = threading.Event(), threading.Event()
    faults = None
    try:
        cluster.start()
        prompts = _prompts()
        reference = [_request(cluster.target, p, Outcome(i, MAX_TOKENS, 60.0)) for i, p in enumerate(prompts)]
        assert all(len(r.tokens) == MAX_TOKENS and not r.recomputes for r in reference), ("the clean run failed", reference)
        arm.touch()  # from now on the prefill workers corrupt chunks
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        t0 = time.monotonic()
        monitor = Monitor(cluster, t0, stop_monitor)
        faults = Faults(cluster, monitor, plan, t0, stop)

        def client(r: random.Random) -> None:
            while not stop.is_set():
                o = _draw(r, plan, len(prompts))
                _request(cluster.target, prompts[o.prompt], o, t0)
                with lock:
                    outcomes.append(o)
                if o.code == grpc.StatusCode.UNAVAILABLE:
                    stop.wait(0.5)  # as a client would, before trying again

        rng = random.Random(plan.seed)
        threads = [threading.Thread(target=client, args=(random.Random(rng.random()),), daemon=True) for _ in range(plan.clients)]
        monitor.start()
        for t in threads:
            t.start()
        faults.start()
        while time.monotonic() - t0 < plan.duration_s or not faults.scheduled_done.is_set():
            assert time.monotonic() - t0 < plan.duration_s + 240, ("the scheduled faults did not finish", faults.actions)
            time.sleep(0.2)
        stop.set()
        faults.join(240)
        for t in threads:
            t.join(plan.timeout_s + 30)
        faults.resume_all()
        if faults.error is not None:
            raise faults.error
        cluster.wait_workers(180)
        idle = wait_idle(cluster.admin, timeout=30)
        stop_monitor.set()
        monitor.join(30)
        final = [_request(cluster.target, p, Outcome(i, MAX_TOKENS, 60.0)) for i, p in enumerate(prompts)]
        monitor.poll_counters()
        injected = len(corrupt_log.read_text().splitlines()) if corrupt_log.exists() else 0
        return ChaosReport(plan, [r.tokens for r in reference], outcomes, faults.actions, final, idle, injected,
                           sum(monitor.caught.values()), monitor.rss, faults.router_down_s, faults.router_killed_at)
    finally:
        stop.set()
        stop_monitor.set()
        if faults is not None:
            faults.resume_all()
        cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--long", action="store_true", help="the 8-minute soak (default: the quick one)")
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-dir", default="/tmp/dsjax-chaos")
    args = p.parse_args()
    os.environ.setdefault("DSJAX_CLUSTER_TOKEN", "chaos-" + os.urandom(8).hex())
    plan = long_plan() if args.long else quick_plan()
    if args.duration is not None:
        plan = dataclasses.replace(plan, duration_s=args.duration)
    if args.seed is not None:
        plan = dataclasses.replace(plan, seed=args.seed)
    report = run_chaos(plan, Path(args.log_dir))
    print(report.summary())
    report.check()
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
