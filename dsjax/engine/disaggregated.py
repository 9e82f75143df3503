"""Disaggregated serving in one process: prefill instances, decode instances, KV pulled between.

    request -> prefill instance with the shortest queue (FCFS batches up to L_m tokens)
            -> first token sampled; KV stays in the prefill pool (status PREFILLED)
            -> a decode instance with room pulls it (least-loaded first; dsjax/runtime/migration.py)
            -> prefill blocks freed once the copy has landed
            -> continuous decode batching until the request finishes

Pull, not push: a decode instance takes a request only when it has the blocks for it plus a
growth reserve, and while the requests it has pulled but not yet batched hold < 5% of its blocks
(DistServe's rule). Until then the KV waits in prefill memory, which is therefore the queue buffer
for bursts; when that memory is full, prefill stops admitting (backpressure) and nothing is dropped.
A decode instance that runs out of blocks preempts its newest request, which goes back to a
prefill instance to be recomputed.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from dsjax.engine.block_manager import BlockManager, blocks_for
from dsjax.engine.policies import decode_should_pull, least_loaded
from dsjax.engine.request import Chunk, FinishReason, Request, Status
from dsjax.engine.runner_interface import Runner
from dsjax.engine.running import RunningRequests
from dsjax.engine.scheduler import SchedulerConfig, pick_decode_batch, pick_prefill_batch

PULL_WAITING_FRACTION = 0.05


class PrefillInstance:
    def __init__(self, runner: Runner, cfg: SchedulerConfig):
        self.runner = runner
        self.cfg = cfg
        self.blocks = BlockManager(runner.cache_config.num_blocks, runner.cache_config.block_size)
        self.waiting: deque[Request] = deque()
        self.ready: deque[Request] = deque()  # prefilled, KV held here until a decode instance pulls it
        self.staged: dict[str, object] = {}  # threaded mode: KV gathered out of the pool at prefill end
        self.inflight_tokens = 0  # prompt tokens of launched batches not yet completed

    def queued_tokens(self) -> int:
        return sum(r.num_tokens for r in self.waiting)

    def load(self) -> int:
        """Prompt tokens queued or being prefilled: a busy instance with an empty queue is not idle
        (the simulator's `SimPrefillInstance.load`)."""
        return self.queued_tokens() + self.inflight_tokens

    def step(self) -> tuple[list[Request], list[Request]]:
        """Run up to pp prefill batches (one per pipeline stage in flight).
        Returns (newly prefilled requests, requests that finished at their first token)."""
        pending = self.launch()
        if pending is None:
            return [], []
        return self.complete(pending, self.runner.collect(pending[1]))

    def launch(self, max_batches: int | None = None):
        """Pick up to pp (or `max_batches`) FCFS batches and dispatch them; None when there is nothing to run."""
        batches = []
        for _ in range(self.runner.pp if max_batches is None else max_batches):
            batch = pick_prefill_batch(self.waiting, self.blocks, self.cfg)
            if not batch:
                break
            batches.append(batch)
        if not batches:
            return None
        start = time.perf_counter()
        for batch in batches:
            for r in batch:
                r.lifecycle.prefill_start = r.lifecycle.prefill_start or start
        launched = self.runner.launch_prefill(
            [([Chunk(r, 0, r.num_tokens) for r in b], [self.blocks.block_table(r.request_id) for r in b]) for b in batches]
        )
        self.inflight_tokens += sum(r.num_tokens for b in batches for r in b)
        return batches, launched

    def complete(self, pending, outs, stage_kv: bool = False) -> tuple[list[Request], list[Request]]:
        """Record the sampled first tokens. Prefilled requests wait in `ready` with their KV in
        this pool; with `stage_kv` their blocks are also gathered right away into `staged` copies
        that a concurrent decode thread can pull without waiting for later prefills."""
        batches, _ = pending
        now = time.perf_counter()
        self.inflight_tokens -= sum(r.num_tokens for b in batches for r in b)  # as launched: no token appended since
        prefilled, finished = [], []
        for batch, tokens in zip(batches, outs):
            for r, tok in zip(batch, tokens):
                if r.status is Status.FINISHED:  # aborted while its prefill ran (threaded mode)
                    continue
                r.lifecycle.prefill_end = now
                if r.append_token(int(tok), now):
                    self.blocks.free(r.request_id)
                    finished.append(r)
                else:
                    if stage_kv:
                        self.staged[r.request_id] = self.runner.stage_kv(self.blocks.block_table(r.request_id))
                    r.status = Status.PREFILLED
                    self.ready.append(r)
                    prefilled.append(r)
        return prefilled, finished

    def release(self, req: Request) -> None:
        """Free a request's prefill blocks (after its KV has landed on decode, or on abort).
        A pulled request is the head of `ready`, and a request in `ready` is in no other queue:
        neither is scanned for it, however long. Only an abort scans `waiting`, whatever the
        request's status says (a worker marks a cancelled request FINISHED before releasing it:
        left queued, it would be prefilled into blocks nobody frees)."""
        if self.ready and self.ready[0] is req:
            self.ready.popleft()
        elif req in self.ready:
            self.ready.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.staged.pop(req.request_id, None)
        self.blocks.free(req.request_id)


class DecodeInstance:
    """Continuous decode batching on one instance.

    Overlapped steps (`overlap`, on where the runner supports it): the next step is picked and
    dispatched while the previous one still runs, its requests' input tokens taken on the device
    from the previous step's output, and only then are the previous step's tokens read back and
    recorded. The host's work between steps (recording tokens, streaming them, admitting pulled
    requests, packing the next batch) then runs while the device computes instead of between its
    steps, as in vLLM's async scheduling and SGLang's overlap scheduler. What it costs: a request
    that stops on an EOS or stop id has already been given one more step (its token is dropped);
    one that ends by length sits the step out, since that end is known in advance."""

    def __init__(self, runner: Runner, cfg: SchedulerConfig, overlap: bool | None = None):
        self.runner = runner
        self.cfg = cfg
        self.blocks = BlockManager(runner.cache_config.num_blocks, runner.cache_config.block_size)
        self.running = RunningRequests()  # keeps load() O(1) (dsjax/engine/running.py)
        self.bytes_pulled = 0
        self.migrations = 0
        if overlap is None:
            overlap = cfg.overlap_decode and getattr(runner, "overlaps_decode", False)
        self.overlap = overlap
        self.inflight: tuple[list[Request], object] | None = None  # overlapped: the step dispatched, not yet recorded

    def load(self) -> int:
        """KV tokens reserved by its requests at their peak (prompt + max_tokens): the load the
        simulator assigns prefilled requests by (`SimDecodeInstance.load`)."""
        return self.running.peak_tokens

    def busy(self) -> bool:
        """Requests to decode, or a dispatched step to record."""
        return bool(self.running) or self.inflight is not None

    def can_pull(self, req: Request) -> bool:
        """DistServe's pull rule (`policies.decode_should_pull`, which the simulator calls too):
        room for the request's KV plus one growth block per running request, and the requests
        pulled but not yet batched hold < 5% of the pool."""
        bs = self.blocks.block_size
        n, cap = len(self.running), self.cfg.max_num_seqs
        idle = self.running[cap:] if n > cap else ()
        growth = min(n, cap)
        return decode_should_pull(
            need_tokens=(blocks_for(req.num_tokens, bs) + growth) * bs,
            free_tokens=self.blocks.num_free_blocks * bs,
            waiting_tokens=sum(len(self.blocks.block_table(r.request_id)) for r in idle) * bs,
            capacity_tokens=self.blocks.capacity_blocks * bs,
            waiting_fraction=PULL_WAITING_FRACTION,
        )

    def pull(self, req: Request, src: PrefillInstance) -> int:
        """Copy the request's KV from `src` into this pool, then free it on `src`. A copy staged at
        prefill end (threaded mode) is used when present, without waiting for it to land."""
        req.status = Status.MIGRATING
        req.lifecycle.migration_start = time.perf_counter()
        table = self.blocks.allocate(req.request_id, req.num_tokens - 1)  # the last token's KV is written by decode
        staged = src.staged.pop(req.request_id, None)
        if staged is None:
            moved = self.runner.pull_kv(src.runner, src.blocks.block_table(req.request_id), table)
        else:  # ordered before the next decode step by data dependence on the pool
            moved = self.runner.insert_kv(table, staged, wait=False)
        src.release(req)
        req.lifecycle.migration_end = time.perf_counter()
        req.status = Status.RUNNING
        self.running.append(req)
        self.bytes_pulled += moved
        self.migrations += 1
        return moved

    def step(self) -> tuple[list[Request], list[Request]]:
        """One decode step. Returns (finished, preempted-for-recompute). Overlapped: dispatch this
        step behind the one in flight, then record that one (the tokens returned are a step older)."""
        if not self.overlap:
            batch, preempted, launched = self.launch()
            if not batch:
                return [], preempted
            return self.complete(batch, self.runner.collect(launched)), preempted
        prev = self.inflight
        batch, preempted, launched = self.launch(after=prev)
        self.inflight = (batch, launched) if batch else None
        if prev is None:
            return [], preempted
        return self.complete(prev[0], self.runner.collect(prev[1])), preempted

    def launch(self, after: tuple[list[Request], object] | None = None):
        """Pick the decode batch (preempting if blocks run out) and dispatch it:
        (batch, preempted, launched). `after`: the step in flight, (its batch, its launch), whose
        sampled tokens the requests it shares with this batch take as input, on the device."""
        if not self.running:
            return [], [], []
        ahead = frozenset(map(id, after[0])) if after is not None else frozenset()
        batch, preempted = pick_decode_batch(self.running, self.blocks, self.cfg, ahead=ahead)
        if not batch:
            return [], preempted, []
        tables = [self.blocks.block_table(r.request_id) for r in batch]
        if ahead.isdisjoint(map(id, batch)):
            return batch, preempted, self.runner.launch_decode(batch, tables)
        return batch, preempted, self.runner.launch_decode(batch, tables, after=after)

    def complete(self, batch: list[Request], outs) -> list[Request]:
        """Record one token per request; returns those that finished (their blocks are freed).
        A request no longer running (aborted, preempted, or finished on an EOS while this step was
        in flight) gets nothing."""
        now = time.perf_counter()
        finished = []
        live = set(map(id, self.running))
        for r, tok in zip(batch, np.concatenate(outs)):
            if r.status is Status.FINISHED or id(r) not in live:
                continue
            r.lifecycle.decode_start = r.lifecycle.decode_start or now
            if r.append_token(int(tok), now):
                self.running.remove(r)
                live.discard(id(r))
                self.blocks.free(r.request_id)
                finished.append(r)
        return finished


class DisaggEngine:
    """Several prefill and decode instances driven by one host loop."""

    def __init__(self, prefill: list[PrefillInstance], decode: list[DecodeInstance]):
        if not prefill or not decode:
            raise ValueError(f"need at least one prefill and one decode instance, got {len(prefill)} and {len(decode)}")
        self.prefill = prefill
        self.decode = decode
        self._where: dict[str, Request] = {}

    def add_request(self, req: Request) -> PrefillInstance:
        """Queue `req` on the prefill instance with the least load; returns that instance."""
        if req.request_id in self._where:
            raise ValueError(f"request_id={req.request_id!r} is already in the engine")
        cap = min(min(i.blocks.capacity_blocks for i in self.prefill), min(i.blocks.capacity_blocks for i in self.decode))
        need = blocks_for(req.peak_tokens, self.prefill[0].blocks.block_size)
        if need > cap:
            raise ValueError(f"prompt_len={req.prompt_len} + max_tokens={req.sampling.max_tokens} needs {need} KV blocks, an instance has {cap}")
        self._where[req.request_id] = req
        inst = self.prefill[least_loaded([(i.load(), len(i.waiting)) for i in self.prefill])]
        inst.waiting.append(req)
        return inst

    def has_unfinished(self) -> bool:
        return bool(self._where)

    def abort(self, request_id: str) -> bool:
        req = self._where.pop(request_id, None)
        if req is None:
            return False
        for inst in self.prefill:
            inst.release(req)
        for inst in self.decode:
            if req in inst.running:
                inst.running.remove(req)
            inst.blocks.free(req.request_id)
        req.finish_reason = FinishReason.CANCELLED
        req.status = Status.FINISHED
        req.lifecycle.finish = time.perf_counter()
        return True

    def _done(self, reqs: list[Request]) -> None:
        now = time.perf_counter()
        for r in reqs:
            r.status = Status.FINISHED
            r.lifecycle.finish = now
            self._where.pop(r.request_id, None)

    def _pull(self) -> list[tuple[PrefillInstance, DecodeInstance]]:
        """FCFS over all prefilled requests; each goes to the least-loaded decode instance that can
        take it. Stops at the first request nobody can take (no overtaking). Returns a (source,
        destination) pair per request moved."""
        moved = []
        while True:
            # Each instance's `ready` is in prefill-end order (its batches complete in order), so
            # the oldest request overall is the oldest of the heads (ties: the lowest instance).
            # Merging the heads keeps a call that pulls nothing O(instances) however long the
            # queues behind them are; it runs at every decode step of every instance.
            heads = [p for p in self.prefill if p.ready]
            if not heads:
                break
            src = min(heads, key=lambda p: p.ready[0].lifecycle.prefill_end)
            req = src.ready[0]
            takers = [d for d in self.decode if d.can_pull(req)]
            if not takers:
                break
            dst = takers[least_loaded([d.load() for d in takers])]
            dst.pull(req, src)
            moved.append((src, dst))
        return moved

    def step(self) -> list[Request]:
        """Prefill on every prefill instance, pull what fits, decode on every decode instance."""
        finished: list[Request] = []
        for inst in self.prefill:
            _, done = inst.step()
            finished += done
        self._pull()
        for inst in self.decode:
            done, preempted = inst.step()
            finished += done
            self.requeue(preempted)
        self._done(finished)
        return finished

    def requeue(self, preempted: list[Request]) -> None:
        """Send requests a decode instance preempted back to the front of the least-loaded
        prefill queue, to be recomputed (oldest first)."""
        for r in reversed(preempted):
            r.status = Status.WAITING
            self.prefill[least_loaded([i.queued_tokens() for i in self.prefill])].waiting.appendleft(r)
