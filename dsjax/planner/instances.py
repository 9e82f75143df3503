"""Simulated serving instances: prefill, decode, and colocated (vLLM-like or chunked prefill).

Each instance reacts to events on a shared `EventLoop` and writes first-token and finish times into
a shared `RequestTable`. Scheduling decisions are delegated to `dsjax.engine.policies`; this file
only does the timing and the bookkeeping of queues and KV tokens.

KV accounting (tokens): a prefill instance holds a request's prompt KV from the start of its batch
until a decode instance has pulled it (and the transfer, if modelled, has finished). A decode or
colocated instance reserves prompt + output tokens when it admits a request and frees them when the
request finishes, so memory can never run out mid-decode and nothing is ever preempted.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from dsjax.engine.policies import (
    chunked_prefill_plan,
    colocated_runs_prefill,
    decode_should_pull,
    prefill_batch_count,
)
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
    ) -> None:
        self.loop, self.reqs, self.latency = loop, reqs, latency
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

    def submit(self, t: float, rid: int) -> None:
        p = self.reqs.prompt[rid]
        if p > self.capacity:
            return  # can never be prefilled here: stays unserved
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
        prompt = self.reqs.prompt
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
        end = t + s
        free[0] = end
        for i in range(1, len(free)):
            end = (end if end > free[i] else free[i]) + s
            free[i] = end
        self.stage0_busy = True
        if len(free) == 1:
            self.loop.at(end, self._on_done_single, batch)
        else:
            self.loop.at(t + s, self._on_stage0_free)
            self.loop.at(end, self._on_done, batch)

    def _on_stage0_free(self, t: float, _arg: object) -> None:
        self.stage0_busy = False
        if self.queue:
            self._try_start(t)

    def _on_done(self, t: float, batch: list[int]) -> None:
        reqs = self.reqs
        for rid in batch:
            self.inflight_tokens -= reqs.prompt[rid]
            reqs.first[rid] = t
            self.on_prefilled(t, rid, self)

    def _on_done_single(self, t: float, batch: list[int]) -> None:
        self.stage0_busy = False
        self._on_done(t, batch)
        if self.queue and not self.stage0_busy:
            self._try_start(t)


class SimDecodeInstance:
    """Continuous batching of pulled requests; jumps from one membership change to the next."""

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
    ) -> None:
        self.loop, self.reqs = loop, reqs
        self.capacity = capacity_tokens
        self.transfer_fixed_s = transfer_fixed_s
        self.join_s = join_s  # instance time per joining request, before the next step
        self.max_batch_size = max_batch_size
        self.waiting_fraction = waiting_fraction
        self.transfer_s_per_token = transfer_s_per_token
        self.assigned: deque[tuple[int, SimPrefillInstance | None]] = deque()  # KV still on the prefill side
        self.pending_tokens = 0  # need of assigned, not yet pulled
        self.reserved = 0  # need of pulled requests (transferring, ready, running)
        self.waiting_tokens = 0  # need of pulled requests not yet running
        self.ready: deque[int] = deque()  # transferred, waiting to join at a step boundary
        self.batch = RunningBatch(latency)
        self.active = False
        self.planned = 0  # steps until the scheduled boundary
        self.version = 0  # invalidates superseded boundary events

    def load(self) -> int:
        return self.reserved + self.pending_tokens

    def assign(self, t: float, rid: int, src: SimPrefillInstance | None) -> None:
        """Queue a prefilled request for pulling (src holds its KV; None in decode-only runs)."""
        need = self.reqs.need[rid]
        if need > self.capacity:
            if src is not None:
                src.release(t, self.reqs.prompt[rid])
            return  # can never be decoded here: finish stays inf
        self.assigned.append((rid, src))
        self.pending_tokens += need
        if self._pull(t):
            self._wake(t)

    def _pull(self, t: float) -> bool:
        """Pull while the policy allows; True if some request became ready right away."""
        reqs = self.reqs
        got = False
        while self.assigned:
            rid, src = self.assigned[0]
            need = reqs.need[rid]
            if not decode_should_pull(
                need_tokens=need,
                free_tokens=self.capacity - self.reserved,
                waiting_tokens=self.waiting_tokens,
                capacity_tokens=self.capacity,
                waiting_fraction=self.waiting_fraction,
            ):
                break
            self.assigned.popleft()
            self.pending_tokens -= need
            self.reserved += need
            self.waiting_tokens += need
            dt = self.transfer_fixed_s + self.transfer_s_per_token * reqs.prompt[rid]
            if dt > 0.0:
                self.loop.at(t + dt, self._on_transferred, (rid, src))
            else:
                if src is not None:
                    src.release(t, reqs.prompt[rid])
                self.ready.append(rid)
                got = True
        return got

    def _on_transferred(self, t: float, arg: tuple[int, SimPrefillInstance | None]) -> None:
        rid, src = arg
        if src is not None:
            src.release(t, self.reqs.prompt[rid])
        self.ready.append(rid)
        self._wake(t)

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
        joined = 0
        while True:
            while ready and len(batch) < self.max_batch_size:
                rid = ready.popleft()
                self.waiting_tokens -= reqs.need[rid]
                batch.join(rid, context_len=reqs.prompt[rid], steps=reqs.output[rid] - 1)
                joined += 1
            if not self._pull(t) or len(batch) >= self.max_batch_size:
                break
        if not len(batch):
            self.active = False
            return
        self.active = True
        # The joiners are landed before the next step: every request in the batch waits for it.
        batch.start_segment(t + joined * self.join_s)
        self._schedule(batch.steps_to_next_boundary())


class SimColocatedInstance:
    """One instance runs both phases: vLLM-like prefill priority, or chunked prefill (Sarathi)."""

    def __init__(
        self,
        loop: EventLoop,
        reqs: RequestTable,
        latency: LatencyModel,
        *,
        capacity_tokens: int,
        max_batch_size: int,
        prefill_token_budget: int,
        chunked: bool = False,
        chunk_tokens: int = 512,
        fused_mixed_steps: bool = True,
        prefill_max_batch_size: int | None = None,
    ) -> None:
        self.fused_mixed_steps = fused_mixed_steps
        self.prefill_max_batch_size = prefill_max_batch_size  # prompts a prefill batch takes (None: no cap)
        self.loop, self.reqs, self.latency = loop, reqs, latency
        self.capacity = capacity_tokens
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        self.chunked = chunked
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[int] = deque()  # not fully prefilled, FCFS
        self.waiting_need = 0
        self.prefilled: dict[int, int] = {}  # chunked: prompt tokens done, for admitted requests
        self.reserved = 0
        self.batch = RunningBatch(latency)
        self.state = "idle"  # idle | decode (a segment of decode steps) | step (prefill/mixed step)
        self.planned = 0
        self.version = 0

    def load(self) -> int:
        return self.reserved + self.waiting_need

    def submit(self, t: float, rid: int) -> None:
        need = self.reqs.need[rid]
        if need > self.capacity:
            return
        self.waiting.append(rid)
        self.waiting_need += need
        self._wake(t)

    def _head_fits(self) -> bool:
        if not self.waiting or len(self.batch) >= self.max_batch_size:
            return False
        head = self.waiting[0]
        if head in self.prefilled:
            return True
        return colocated_runs_prefill(
            num_waiting=len(self.waiting), head_need_tokens=self.reqs.need[head], free_tokens=self.capacity - self.reserved
        )

    def _wake(self, t: float) -> None:
        if self.state == "idle":
            self._step(t)
        elif self.state == "decode" and self._head_fits():
            k = self.batch.steps_until(t)
            if k < self.planned:
                self._schedule(k)

    def _schedule(self, k: int) -> None:
        self.planned = k
        self.version += 1
        self.loop.at(self.batch.time_after(k), self._on_boundary, self.version)

    def _finish(self, t: float, finished: list[int]) -> None:
        reqs = self.reqs
        for rid in finished:
            reqs.finish[rid] = t
            self.reserved -= reqs.need[rid]

    def _on_boundary(self, t: float, version: int) -> None:
        if version != self.version:
            return
        self._finish(t, self.batch.advance(self.planned))
        self._step(t)

    def _step(self, t: float) -> None:
        """At a step boundary: choose the next step."""
        if self._head_fits():
            if self.chunked:
                self._start_mixed(t)
            else:
                self._start_prefill(t)
            return
        if len(self.batch):
            self.state = "decode"
            self.batch.start_segment(t)
            self._schedule(self.batch.steps_to_next_boundary())
            return
        self.state = "idle"

    def _admit(self, rid: int) -> None:
        need = self.reqs.need[rid]
        self.reserved += need
        self.waiting_need -= need

    def _start_prefill(self, t: float) -> None:
        reqs, waiting = self.reqs, self.waiting
        k = prefill_batch_count(
            (reqs.prompt[r] for r in waiting),
            token_budget=self.prefill_token_budget,
            # the engine's pick_prefill_batch: min(max_prefill_seqs, room in the decode batch)
            max_batch_size=min(self.max_batch_size - len(self.batch), self.prefill_max_batch_size or self.max_batch_size),
            free_kv_tokens=self.capacity - self.reserved,
            kv_tokens=(reqs.need[r] for r in waiting),
        )
        new = [waiting.popleft() for _ in range(k)]
        total = 0
        sq = 0
        longest = 0
        for rid in new:
            self._admit(rid)
            p = reqs.prompt[rid]
            total += p
            sq += p * p
            longest = p if p > longest else longest
        self.state = "step"
        self.loop.at(t + self.latency.prefill_s(total, sq, k, longest), self._on_prefill_done, new)

    def _on_prefill_done(self, t: float, new: list[int]) -> None:
        for rid in new:
            self._first_token(t, rid)
        self._step(t)

    def _first_token(self, t: float, rid: int) -> None:
        reqs = self.reqs
        reqs.first[rid] = t
        if reqs.output[rid] == 1:
            self._finish(t, [rid])
        else:
            self.batch.join(rid, context_len=reqs.prompt[rid], steps=reqs.output[rid] - 1)

    def _start_mixed(self, t: float) -> None:
        reqs, waiting, done = self.reqs, self.waiting, self.prefilled
        num_decodes = len(self.batch)
        plan = chunked_prefill_plan(
            num_decodes=num_decodes,
            remaining_prompt=(reqs.prompt[r] - done.get(r, 0) for r in waiting),
            token_budget=self.chunk_tokens,
        )
        chunks: list[tuple[int, int]] = []
        total = 0
        quad = 0
        chunk_keys = 0
        slots = self.max_batch_size - num_decodes
        for rid, c in zip(waiting, plan):
            if rid not in done:
                if slots <= 0 or reqs.need[rid] > self.capacity - self.reserved:
                    break  # strict FCFS: later requests do not overtake
                self._admit(rid)
                done[rid] = 0
            slots -= 1
            chunks.append((rid, c))
            total += c
            quad += c * (2 * done[rid] + c)
            chunk_keys = max(chunk_keys, done[rid] + c)
        if not chunks:  # decodes fill the budget: plain decode step(s)
            self.state = "decode"
            self.batch.start_segment(t)
            self._schedule(1)
            return
        self.state = "step"
        dt = self.latency.mixed_step_s(total, quad, num_decodes, self.batch.sum_ctx, num_chunks=len(chunks),
                                       chunk_max_keys=chunk_keys, decode_max_keys=self.batch.longest,
                                       fused=self.fused_mixed_steps)
        self.loop.at(t + dt, self._on_mixed_done, chunks)

    def _on_mixed_done(self, t: float, chunks: list[tuple[int, int]]) -> None:
        if len(self.batch):
            self._finish(t, self.batch.advance(1))
        done, reqs = self.prefilled, self.reqs
        for rid, c in chunks:
            done[rid] += c
            if done[rid] == reqs.prompt[rid]:
                self.waiting.popleft()  # completed chunks are always at the head
                del done[rid]
                self._first_token(t, rid)
        self._step(t)
