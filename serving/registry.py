"""The router's view of its workers: registration, heartbeats, liveness and load.

Workers call `Register` when they start (after warming up) and `Heartbeat` every
`heartbeat_s` with their stats. A worker is dropped when its heartbeats stop for `timeout_s`
(a stopped or partitioned process) or when a call to it fails with UNAVAILABLE (a dead one); the
calls in flight to a dropped worker are cancelled so no request hangs on it. A worker that comes
back (restarted, same worker_id) registers again and replaces its old entry; one the router has
forgotten learns so from its next heartbeat (`registered=False`) and re-registers (a router that
restarted thus gets its workers back within a heartbeat).

Watchdog: a worker whose heartbeats keep coming while its engine thread is stuck (its stats'
`stalled_seconds`, serving/engine_loop.py, over `hung_s`) is quarantined: routed nothing, its calls
cancelled (the router recomputes their requests elsewhere), until it reports progress again. The
quarantine outlives a re-registration of the same process.

Decode workers learn from the replies to Register and Heartbeat which prefill workers are
registered: the only KV sources they accept (serving/worker_checks.py `Peers`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import grpc

from serving.channels import Channels
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.tls import ClusterTLS
from serving.worker_checks import Invalid, check_id

log = logging.getLogger(__name__)


class _Busy:
    """Registry.acquire's answer when every live worker of the role is at its in-flight cap (the
    caller waits in the router for a slot; None means no worker of the role at all)."""

    def __repr__(self) -> str:
        return "BUSY"


BUSY = _Busy()


@dataclasses.dataclass(eq=False)
class WorkerEntry:
    info: wpb.WorkerInfo
    channel: grpc.Channel
    last_seen: float
    stats: wpb.InstanceStats | None = None
    inflight: int = 0  # requests the router has on it now
    load: int = 0  # their KV tokens (a prefill's prompt, a decode's peak): what requests are balanced by
    calls: set = dataclasses.field(default_factory=set)
    hung: bool = False  # quarantined by the watchdog: routed nothing

    @property
    def id(self) -> str:
        return self.info.worker_id

    @property
    def address(self) -> str:
        return self.info.address

    @property
    def prefill(self) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self.channel)

    @property
    def decode(self) -> worker_pb2_grpc.DecodeWorkerStub:
        return worker_pb2_grpc.DecodeWorkerStub(self.channel)

    @property
    def worker(self) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(self.channel)


class Registry(worker_pb2_grpc.RegistryServicer):
    def __init__(self, *, heartbeat_s: float = 0.5, timeout_s: float = 5.0, cluster_token: str | None = None,
                 model: str | None = None, block_size: int | None = None, dtype: str | None = None,
                 weights_hash: str | None = None, pin: tuple[str, ...] = (), tls: ClusterTLS | None = None,
                 hung_s: float | None = 60.0, max_message: int | None = None,
                 roles: tuple[int, ...] = (wpb.PREFILL, wpb.DECODE)):
        """The cluster's fingerprint: `model`, `block_size`, `dtype` and `weights_hash`
        (serving/fingerprint.py), when given, are what every registering worker must serve with (a
        worker with other weights, another dtype or another KV page size would corrupt the requests
        routed to it). A field named in `pin` and not given is fixed by the first worker accepted
        (a router that cannot read the weights pins their hash). `tls`: the router's calls to the
        workers are mutual TLS (serving/tls.py). `hung_s`: the watchdog's threshold (None: off).
        `max_message`: the message limit of its channels to the workers (the largest request)."""
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.hung_s = hung_s
        self.roles = roles  # the roles this cluster serves with: disaggregated, or replicas (COLOCATED)
        self._hung: dict[str, int] = {}  # worker_id -> pid of a quarantined process
        self.expect = {"model": model, "block_size": block_size, "dtype": dtype, "weights_hash": weights_hash}
        self._pin = tuple(f for f in pin if self.expect[f] is None)
        self.channels = Channels(cluster_token, tls, max_message)  # the router's calls to the workers carry the token
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerEntry] = {}
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="registry-reaper", daemon=True)
        self._reaper.start()

    # ---- gRPC (workers call these) -------------------------------------------------------
    def Register(self, request: wpb.WorkerInfo, context):  # noqa: N802
        try:
            check_id(request.worker_id, "worker_id")
            check_id(request.address, "address")
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.role not in (wpb.PREFILL, wpb.DECODE, wpb.COLOCATED):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role={request.role} must be PREFILL, DECODE or COLOCATED")
        if request.role not in self.roles:  # a replica in a disaggregated cluster, or the other way round
            names = " or ".join(wpb.Role.Name(r) for r in self.roles)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"role={wpb.Role.Name(request.role)} does not serve in this cluster: it takes {names}")
        with self._lock:  # checked and pinned at once: two first workers cannot pin different values
            problem = self.mismatch(request)
            if problem is None:
                for field in self._pin:
                    if self.expect[field] is None:
                        self.expect[field] = getattr(request, field)
                        log.info("cluster %s pinned to %r by worker %s", field, self.expect[field], request.worker_id)
        if problem is not None:
            log.warning("refused worker %s: %s", request.worker_id, problem)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        self.add(request)
        return wpb.RegisterResponse(heartbeat_seconds=self.heartbeat_s, prefill_addresses=self._peers(request.role))

    def mismatch(self, info: wpb.WorkerInfo) -> str | None:
        """Why this worker cannot join the cluster (None: it can): the first fingerprint field that
        differs, with both values."""
        for field, want in self.expect.items():
            got = getattr(info, field)
            if want is not None and got != want:
                return f"worker {info.worker_id!r} has {field}={got!r}, this cluster serves {field}={want!r}"
        return None

    def Heartbeat(self, request: wpb.HeartbeatRequest, context):  # noqa: N802
        with self._lock:
            w = self._workers.get(request.worker_id)
            if w is None or (request.stats.pid and request.stats.pid != w.info.pid):
                return wpb.HeartbeatResponse(registered=False)
            w.last_seen = time.monotonic()
            w.stats = request.stats
            stalled = request.stats.stalled_seconds
            changed = (self.hung_s is not None and stalled > self.hung_s) != w.hung
            if changed:
                w.hung = not w.hung
                if w.hung:
                    self._hung[w.id] = w.info.pid
                else:
                    self._hung.pop(w.id, None)
                    self._changed.notify_all()
        if changed and w.hung:
            log.warning("worker %s quarantined: its engine made no progress for %.1fs (over %.1fs); cancelling its calls",
                        w.id, stalled, self.hung_s)
            self._cancel_calls(w)
        elif changed:
            log.warning("worker %s made progress again: back in routing", w.id)
        return wpb.HeartbeatResponse(registered=True, prefill_addresses=self._peers(w.info.role))

    def _peers(self, role: int) -> list[str]:
        """What a worker of `role` is told of the others: decode workers, the prefill addresses."""
        if role != wpb.DECODE:
            return []
        with self._lock:
            return sorted(w.address for w in self._workers.values() if w.info.role == wpb.PREFILL)

    # ---- membership ----------------------------------------------------------------------
    def add(self, info: wpb.WorkerInfo) -> None:
        """Register a worker. The same process registering again (same pid and address, e.g.
        after a missed heartbeat) keeps its entry and its calls in flight; a new process under the
        same worker_id replaces the old entry, whose calls are cancelled."""
        with self._lock:
            old = self._workers.get(info.worker_id)
            if old is not None and old.info.pid == info.pid and old.address == info.address:
                old.info, old.last_seen = info, time.monotonic()
                log.info("worker %s (pid %d) registered again: kept", info.worker_id, info.pid)
                return
            self._workers.pop(info.worker_id, None)
            if old is not None and old.address != info.address:
                self.channels.retire(old.address)
            entry = WorkerEntry(info, self.channels.get(info.address), time.monotonic())
            if self._hung.get(info.worker_id, info.pid) != info.pid:
                del self._hung[info.worker_id]  # a new process: the quarantine was the old one's
            entry.hung = info.worker_id in self._hung  # the same one: quarantined until it progresses
            self._workers[info.worker_id] = entry
            self._changed.notify_all()
        if old is not None:
            self._cancel_calls(old)
        log.info("worker %s (%s, pid %d) registered at %s", info.worker_id, wpb.Role.Name(info.role), info.pid, info.address)

    def drop(self, worker_id: str, reason: str, entry: WorkerEntry | None = None) -> None:
        """Forget a worker (only `entry` if given, not a newer registration) and cancel its calls."""
        with self._lock:
            w = self._workers.get(worker_id)
            if w is None or (entry is not None and w is not entry):
                return
            del self._workers[worker_id]
            if all(o.address != w.address for o in self._workers.values()):
                self.channels.retire(w.address)  # a restarted worker comes back on a new port
        log.warning("worker %s dropped: %s", worker_id, reason)
        self._cancel_calls(w)

    def _cancel_calls(self, w: WorkerEntry) -> None:
        with self._lock:
            calls, w.calls = list(w.calls), set()
        for c in calls:
            c.cancel()

    def _reap(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.channels.close_retired()
            now = time.monotonic()
            with self._lock:
                stale = [w for w in self._workers.values() if now - w.last_seen > self.timeout_s]
            for w in stale:
                self.drop(w.id, f"no heartbeat for {now - w.last_seen:.1f}s", w)

    def close(self) -> None:
        self._stop.set()
        self.channels.close()

    # ---- routing -------------------------------------------------------------------------
    def workers(self, role: int | None = None) -> list[WorkerEntry]:
        with self._lock:
            return [w for w in self._workers.values() if role is None or w.info.role == role]

    def has(self, role: int) -> bool:
        """A worker of `role` can be routed to (registered, not quarantined)."""
        return any(not w.hung for w in self.workers(role))

    def wait_for(self, role: int, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(w.info.role == role and not w.hung for w in self._workers.values()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def acquire(self, role: int, tokens: int = 0, max_inflight: int | None = None) -> WorkerEntry | _Busy | None:
        """The least-loaded live worker of `role`, or None; the request counts on it (`tokens`
        of KV load, one in flight) until `release`. Load is what the in-process engines and the
        simulator balance by (`policies.least_loaded`): a prefill worker's prompt tokens queued or
        being prefilled, a decode worker's peak KV tokens (prompt + max_tokens) of the requests
        assigned to it; then requests in flight, its reported queue, its id. With `max_inflight`,
        only workers with fewer calls in flight qualify; `BUSY` when live ones exist but none does."""
        with self._lock:
            live = [w for w in self._workers.values() if w.info.role == role and not w.hung]
            if not live:
                return None
            if max_inflight is not None:
                live = [w for w in live if w.inflight < max_inflight]
                if not live:
                    return BUSY
            w = min(live, key=lambda w: (w.load, w.inflight, w.stats.waiting if w.stats else 0, w.id))
            w.inflight += 1
            w.load += tokens
            return w

    def release(self, w: WorkerEntry, tokens: int = 0) -> None:
        with self._lock:
            w.inflight -= 1
            w.load -= tokens

    def track(self, w: WorkerEntry, call) -> bool:
        """Remember a call to `w` so it is cancelled if `w` is dropped; False if already dropped."""
        with self._lock:
            if self._workers.get(w.id) is not w:
                return False
            w.calls.add(call)
            return True

    def untrack(self, w: WorkerEntry, call) -> None:
        with self._lock:
            w.calls.discard(call)

    # ---- debug ---------------------------------------------------------------------------
    def instances(self, timeout: float = 5.0) -> list[wpb.InstanceStats]:
        """Live stats of every registered worker (a worker that does not answer: last known, alive=False)."""
        out = []
        entries = self.workers()
        futs = [(w, w.worker.Stats.future(wpb.StatsRequest(), timeout=timeout)) for w in entries]
        for w, fut in futs:
            try:
                s = fut.result()
            except grpc.RpcError:
                s = wpb.InstanceStats()
                if w.stats is not None:
                    s.CopyFrom(w.stats)
                s.worker_id, s.role, s.alive = w.id, w.info.role, False
            s.address, s.hung = w.address, w.hung
            with self._lock:
                s.routed, s.routed_tokens = w.inflight, w.load
            out.append(s)
        return sorted(out, key=lambda s: (s.role, s.worker_id))
