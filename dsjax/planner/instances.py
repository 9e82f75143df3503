"""Simulated disaggregated instances: prefill and decode (colocated ones: colocated_instance.py).

Each instance reacts to events on a shared `EventLoop` and writes first-token and finish times into
a shared `RequestTable`. Scheduling decisions are delegated to `dsjax.engine.policies`; this file
only does the timing and the bookkeeping of queues and KV tokens.

KV accounting (tokens), as the engine's block managers do it (dsjax/engine/disaggregated.py):
- a prefill instance holds a request's prefilled KV from the start of its batch until a decode
  instance has pulled it (and the transfer, if modelled, has finished);
- a decode instance holds what a request has written so far: its context when pulled, one more
  token every step. It pulls while the request's context plus one block of growth per request it
  runs fits in its free memory (`policies.decode_should_pull`), so its requests' final KV may
  exceed its pool; when a step would not fit, the newest request is preempted and goes back to
  the front of a prefill queue to be prefilled again over everything it holds (the engine's
  recompute; `RequestTable.plen`). Block rounding is not modelled (tokens, not blocks).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from dsjax.engine.policies import decode_should_pull, prefill_batch_count
from dsjax.planner.events import EventLoop, RequestTable
from dsjax.planner.latency import LatencyModel
from dsjax.planner.running_batch import RunningBatch


class SimPrefillInstance:
    """FCFS prefill batching up to L_m tokens over a pipeline of `latency.pp` stages.

    A batch occupies every stage for the same stage time s; stage i starts it once stage i-1 is done
    with it and stage i is free, so up to pp batches are in flight. A new batch is formed whenever
    stage 0 frees up.
    """

    def __init__(
        self,
        loop: EventLoop,
        reqs: RequestTable,
        latency: LatencyModel,
        *,
        capacity_tokens: int,
        token_budget: int,
        max_batch_size: int,
        on_prefilled: Callable[[float, int, "SimPrefillInstance"], None],
        host_s: float = 0.0,
    ) -> None:
        self.loop, self.reqs, self.latency = loop, reqs, latency
        self.host_s = host_s  # host time before each batch reaches the first stage
        self.capacity = capacity_tokens
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.on_prefilled = on_prefilled
        self.queue: deque[int] = deque()
        self.queued_tokens = 0
        self.inflight_tokens = 0
        self.kv_used = 0
        self.stage_free = [0.0] * latency.pp
        self.stage0_busy = False

    def load(self) -> int:
        """Prompt tokens queued or being prefilled (the "queue length" used for dispatch)."""
        return self.queued_tokens + self.inflight_tokens

    def submit(self, t: float, rid: int, front: bool = False) -> None:
        """Queue a request (`front`: a preempted one, recomputed before the queue, as the engine's
        `DisaggEngine.requeue` does)."""
        p = self.reqs.plen[rid]
        if p > self.capacity:
            return  # can never be prefilled here: stays unserved
        if front:
            self.queue.appendleft(rid)
        else:
            self.queue.append(rid)
        self.queued_tokens += p
        if not self.stage0_busy:
            self._try_start(t)

    def release(self, t: float, tokens: int) -> None:
        """A request's prompt KV left this instance."""
        self.kv_used -= tokens
        if self.queue and not self.stage0_busy:
            self._try_start(t)

    def _try_start(self, t: float) -> None:
        prompt = self.reqs.plen
        queue = self.queue
        k = prefill_batch_count(
            (prompt[r] for r in queue),
            token_budget=self.token_budget,
            max_batch_size=self.max_batch_size,
            free_kv_tokens=self.capacity - self.kv_used,
        )
        if k == 0:
            return  # waiting for KV memory; release() retries
        batch = [queue.popleft() for _ in range(k)]
        total = 0
        sq = 0
        longest = 0
        for r in batch:
            p = prompt[r]
            total += p
            sq += p * p
            longest = p if p > longest else longest
        self.queued_tokens -= total
        self.inflight_tokens += total
        self.kv_used += total
        s = self.latency.prefill_stage_s(total, sq, k, longest)
        free = self.stage_free
        end = t + self.host_s + s
        free[0] = end
        for i in range(1, len(free)):
            end = (end if end > free[i] else free[i]) + s
            free[i] = end
        self.stage0_busy = True
        if len(free) == 1:
            self.loop.at(end, self._on_done_single, batch)
        else:
            self.loop.at(free[0], self._on_stage0_free)
            self.loop.at(end, self._on_done, batch)

    def _on_stage0_free(self, t: float, _arg: object) -> None:
        self.stage0_busy = False
        if self.queue:
            self._try_start(t)

    def _on_done(self, t: float, batch: list[int]) -> None:
        reqs = self.reqs
        for rid in batch:
            self.inflight_tokens -= reqs.plen[rid]
            if not reqs.done[rid]:  # a recompute's first token was sent long ago
                reqs.first[rid] = t
            self.on_prefilled(t, rid, self)

    def _on_done_single(self, t: float, batch: list[int]) -> None:
        self.stage0_busy = False
        self._on_done(t, batch)
        if self.queue and not self.stage0_busy:
            self._try_start(t)


class SimDecodeInstance:
    """Continuous batching of pulled requests; jumps from one membership change to the next (a
    finish, a join, or the step whose KV would not fit: module docstring)."""

    def __init__(
        self,
        loop: EventLoop,
        reqs: RequestTable,
        latency: LatencyModel,
        *,
        capacity_tokens: int,
        max_batch_size: int,
        waiting_fraction: float = 0.05,
        transfer_s_per_token: float = 0.0,
        transfer_fixed_s: float = 0.0,
        join_s: float = 0.0,
        host_s: float = 0.0,
        block_size: int = 16,
        on_preempted: Callable[[float, int], None] | None = None,
    ) -> None:
        self.loop, self.reqs = loop, reqs
        self.capacity = capacity_tokens
        self.transfer_fixed_s = transfer_fixed_s
        self.join_s = join_s  # instance time per joining request, before the next step
        self.max_batch_size = max_batch_size
        self.waiting_fraction = waiting_fraction
        self.transfer_s_per_token = transfer_s_per_token
        self.block_size = block_size
        self.on_preempted = on_preempted
        self.assigned: deque[tuple[int, SimPrefillInstance | None]] = deque()  # KV still on the prefill side
        self.pending_tokens = 0  # peak KV of assigned, not yet pulled (dispatch load)
        self.reserved = 0  # peak KV of pulled requests (dispatch load: the engine's DecodeInstance.load)
        self.joining: dict[int, int] = {}  # pulled, not yet running (transferring or ready): rid -> KV tokens
        self.held = 0  # sum(joining.values())
        self.ready: deque[int] = deque()  # transferred, waiting to join at a step boundary
        self.batch = RunningBatch(latency, host_s)
        self.active = False
        self.planned = 0  # steps until the scheduled boundary
        self.version = 0  # invalidates superseded boundary events
        self.preemptions = 0

    def load(self) -> int:
        return self.reserved + self.pending_tokens

    def assign(self, t: float, rid: int, src: SimPrefillInstance | None) -> None:
        """Queue a prefilled request for pulling (src holds its KV; None in decode-only runs)."""
        need = self.reqs.need[rid]
        if need > self.capacity:
            if src is not None:
                src.release(t, self.reqs.plen[rid])
            return  # can never be decoded here: finish stays inf
        self.assigned.append((rid, src))
        self.pending_tokens += need
        if self._pull(t):
            self._wake(t)

    # ---- KV memory ---------------------------------------------------------------------------
    def _running_kv(self, t: float) -> int:
        """KV the running batch holds at time t: within a segment, the in-flight step's token
        included; between steps (not active), what the requests have written."""
        return self.batch.kv_at(t) if self.active else self.batch.kv_tokens

    def _steps_that_fit(self) -> int:
        """Steps of the current segment whose KV fits beside what is joining."""
        return self.batch.steps_that_fit(self.capacity - self.held)

    def _pull(self, t: float) -> bool:
        """Pull while the policy allows; True if some request became ready right away."""
        reqs = self.reqs
        got = False
        bs = self.block_size
        while self.assigned:
            rid, src = self.assigned[0]
            kv = reqs.plen[rid]
            pending = len(self.batch) + len(self.joining)
            excess = pending - self.max_batch_size
            if not decode_should_pull(
                need_tokens=kv + min(pending, self.max_batch_size) * bs,
                free_tokens=self.capacity - self._running_kv(t) - self.held,
                waiting_tokens=sum(v for _, v in zip(range(excess), reversed(self.joining.values()))) if excess > 0 else 0,
                capacity_tokens=self.capacity,
                waiting_fraction=self.waiting_fraction,
            ):
                break
            self.assigned.popleft()
            self.pending_tokens -= reqs.need[rid]
            self.reserved += reqs.need[rid]
            self.joining[rid] = kv
            self.held += kv
            dt = self.transfer_fixed_s + self.transfer_s_per_token * reqs.plen[rid]
            if dt > 0.0:
                self.loop.at(t + dt, self._on_transferred, (rid, src))
            else:
                if src is not None:
                    src.release(t, kv)
                self.ready.append(rid)
                got = True
        if self.active and len(self.batch):  # what joins must fit beside the running batch's growth
            fit = self._steps_that_fit()
            if fit < self.planned:
                self._schedule(max(fit, self.batch.steps_until(t)))
        return got

    def _on_transferred(self, t: float, arg: tuple[int, SimPrefillInstance | None]) -> None:
        rid, src = arg
        if src is not None:
            src.release(t, self.reqs.plen[rid])
        self.ready.append(rid)
        self._wake(t)

    def _preempt_newest(self, t: float) -> None:
        """Free the newest request's KV and send it back to be prefilled again (the engine's
        `pick_decode_batch`: pulled-but-idle requests are the newest, then the running ones)."""
        reqs = self.reqs
        if self.ready:  # (a request whose KV is still in flight is left to land)
            rid = self.ready.pop()
            self.held -= self.joining.pop(rid)
        else:
            rid = self.batch.newest()
            reqs.preempted(rid, self.batch.remove(rid))
        self.reserved -= reqs.need[rid]
        self.preemptions += 1
        if self.on_preempted is not None:
            self.on_preempted(t, rid)

    # ---- steps -------------------------------------------------------------------------------
    def _wake(self, t: float) -> None:
        """A request is ready: join now if idle, else at the first step boundary at or after t."""
        if not self.active:
            self._boundary(t)
            return
        if len(self.batch) >= self.max_batch_size:
            return
        k = self.batch.steps_until(t)
        if k < self.planned:
            self._schedule(k)

    def _schedule(self, k: int) -> None:
        self.planned = k
        self.version += 1
        self.loop.at(self.batch.time_after(k), self._on_boundary, self.version)

    def _on_boundary(self, t: float, version: int) -> None:
        if version != self.version:
            return
        reqs = self.reqs
        for rid in self.batch.advance(self.planned):
            reqs.finish[rid] = t
            self.reserved -= reqs.need[rid]
        self._boundary(t)

    def _boundary(self, t: float) -> None:
        reqs, batch, ready = self.reqs, self.batch, self.ready
        self.active = False  # between steps: the batch's KV is batch.sum_ctx, not a segment's
        joined = 0
        while True:
            while ready and len(batch) < self.max_batch_size:
                rid = ready.popleft()
                self.held -= self.joining.pop(rid)
                batch.join(rid, context_len=reqs.plen[rid], steps=reqs.output[rid] - reqs.done[rid] - 1)
                joined += 1
            if not self._pull(t) or len(batch) >= self.max_batch_size:
                break
        while len(batch) and batch.sum_ctx + self.held > self.capacity:  # the next step's KV must fit
            self._preempt_newest(t)
        if not len(batch):
            return
        self.active = True
        # The joiners are landed before the next step: every request in the batch waits for it.
        batch.start_segment(t + joined * self.join_s)
        self._schedule(min(batch.steps_to_next_boundary(), self._steps_that_fit()))
