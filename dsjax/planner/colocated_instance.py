"""A simulated colocated instance: both phases on one instance, vLLM-like prefill priority or
chunked prefill (Sarathi). Scheduling decisions are `dsjax.engine.policies`' as in the engine's
dsjax/engine/colocated.py.

KV accounting (tokens) as the engine's block manager does it: a prompt is admitted when its KV
fits in what is free (a chunked prompt holds its whole prompt's KV from its first chunk); a running
request holds what it has written, one token more every decode step; when a step would not fit,
the newest running request is preempted and goes back to the front of the queue, to be prefilled
again over everything it holds (`RequestTable.plen`)."""

from __future__ import annotations

from collections import deque

from dsjax.engine.policies import chunked_prefill_plan, colocated_runs_prefill, prefill_batch_count
from dsjax.planner.events import EventLoop, RequestTable
from dsjax.planner.latency import LatencyModel
from dsjax.planner.running_batch import RunningBatch


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
        host_s: float = 0.0,
        prefill_host_s: float = 0.0,
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
        self.reserved = 0  # peak KV (prompt + output) of admitted requests: the dispatch load
        self.prefill_kv = 0  # KV of admitted requests not running yet (being prefilled)
        self.preemptions = 0
        self.host_s = host_s  # host time before a step that continues running requests
        self.prefill_host_s = prefill_host_s  # host time before a step that only starts prompts
        self.batch = RunningBatch(latency, host_s)
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

    def _kv(self, t: float | None = None) -> int:
        """KV held: the running batch's (at time t within a decode segment, the in-flight step's
        token included; else at the boundary) and the admitted prompts'."""
        batch = self.batch
        if t is not None and self.state == "decode" and len(batch):
            return batch.kv_at(t) + self.prefill_kv
        return batch.kv_tokens + self.prefill_kv

    def _head_fits(self, t: float | None = None) -> bool:
        if not self.waiting or len(self.batch) >= self.max_batch_size:
            return False
        head = self.waiting[0]
        if head in self.prefilled:
            return True
        return colocated_runs_prefill(
            num_waiting=len(self.waiting), head_need_tokens=self.reqs.plen[head], free_tokens=self.capacity - self._kv(t)
        )

    def _wake(self, t: float) -> None:
        if self.state == "idle":
            self._step(t)
        elif self.state == "decode" and self._head_fits(t):
            k = self.batch.steps_until(t)
            if k < self.planned:
                self._schedule(k)

    def _schedule(self, k: int) -> None:
        self.planned = k
        self.version += 1
        self.loop.at(self.batch.time_after(k), self._on_boundary, self.version)

    def _fit_decodes(self, t: float) -> int:
        """Preempt the newest running requests until the next decode step's KV fits; returns how
        many steps of the batch as it is fit."""
        batch, reqs = self.batch, self.reqs
        while len(batch) and batch.sum_ctx + self.prefill_kv > self.capacity:
            rid = batch.newest()
            reqs.preempted(rid, batch.remove(rid))
            self.reserved -= reqs.need[rid]
            self.waiting_need += reqs.need[rid]
            self.waiting.appendleft(rid)
            self.preemptions += 1
        return batch.steps_that_fit(self.capacity - self.prefill_kv) if len(batch) else 0

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
        fit = self._fit_decodes(t)
        if len(self.batch):
            self.state = "decode"
            self.batch.start_segment(t)
            self._schedule(min(self.batch.steps_to_next_boundary(), fit))
            return
        self.state = "idle"
        if self._head_fits():  # everything was preempted: the head may fit now
            self._step(t)

    def _admit(self, rid: int) -> None:
        need = self.reqs.need[rid]
        self.reserved += need
        self.waiting_need -= need
        self.prefill_kv += self.reqs.plen[rid]

    def _start_prefill(self, t: float) -> None:
        reqs, waiting = self.reqs, self.waiting
        k = prefill_batch_count(
            (reqs.plen[r] for r in waiting),
            token_budget=self.prefill_token_budget,
            # the engine's pick_prefill_batch: min(max_prefill_seqs, room in the decode batch)
            max_batch_size=min(self.max_batch_size - len(self.batch), self.prefill_max_batch_size or self.max_batch_size),
            free_kv_tokens=self.capacity - self._kv(),
        )
        new = [waiting.popleft() for _ in range(k)]
        total = 0
        sq = 0
        longest = 0
        for rid in new:
            self._admit(rid)
            p = reqs.plen[rid]
            total += p
            sq += p * p
            longest = p if p > longest else longest
        self.state = "step"
        self.loop.at(t + self.prefill_host_s + self.latency.prefill_s(total, sq, k, longest), self._on_prefill_done, new)

    def _on_prefill_done(self, t: float, new: list[int]) -> None:
        for rid in new:
            self._first_token(t, rid)
        self._step(t)

    def _first_token(self, t: float, rid: int) -> None:
        reqs = self.reqs
        self.prefill_kv -= reqs.plen[rid]
        if not reqs.done[rid]:  # a recompute's first token was sent long ago
            reqs.first[rid] = t
        if reqs.done[rid] + 1 >= reqs.output[rid]:
            self._finish(t, [rid])
        else:
            self.batch.join(rid, context_len=reqs.plen[rid], steps=reqs.output[rid] - reqs.done[rid] - 1)

    def _start_mixed(self, t: float) -> None:
        reqs, waiting, done = self.reqs, self.waiting, self.prefilled
        self._fit_decodes(t)  # the decodes grow first (the engine's pick_decode_batch), then prompts are admitted
        num_decodes = len(self.batch)
        plan = chunked_prefill_plan(
            num_decodes=num_decodes,
            remaining_prompt=(reqs.plen[r] - done.get(r, 0) for r in waiting),
            token_budget=self.chunk_tokens,
        )
        chunks: list[tuple[int, int]] = []
        total = 0
        quad = 0
        chunk_keys = 0
        slots = self.max_batch_size - num_decodes
        for rid, c in zip(waiting, plan):
            if rid not in done:
                if slots <= 0 or reqs.plen[rid] > self.capacity - self.prefill_kv - self.batch.sum_ctx:
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
        dt += self.host_s if num_decodes else self.prefill_host_s
        self.loop.at(t + dt, self._on_mixed_done, chunks)

    def _on_mixed_done(self, t: float, chunks: list[tuple[int, int]]) -> None:
        if len(self.batch):
            self._finish(t, self.batch.advance(1))
        done, reqs = self.prefilled, self.reqs
        for rid, c in chunks:
            done[rid] += c
            if done[rid] == reqs.plen[rid]:
                self.waiting.popleft()  # completed chunks are always at the head
                del done[rid]
                self._first_token(t, rid)
        self._step(t)
