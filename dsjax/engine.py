"""A single-instance engine: continuous batching with prefill first (vLLM-style colocation).

One step is: pick a batch, run it, record the tokens:

    batch = pick_prefill_batch(...) or pick_decode_batch(...)
    tokens = runner.prefill(...) / runner.decode(...)
    finished = [r for r, t in zip(batch, tokens) if r.append_token(t, now)]

Prefill batches take priority, so a new prompt delays the running decodes by one prefill; that
interference is exactly what disaggregation removes.
"""

from __future__ import annotations

import time
from collections import deque

from dsjax.batch import Chunk
from dsjax.block_manager import BlockManager
from dsjax.request import FinishReason, Request, Status
from dsjax.runner import ModelRunner
from dsjax.scheduler import SchedulerConfig, pick_decode_batch, pick_prefill_batch


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: SchedulerConfig):
        self.runner = runner
        self.cfg = scheduler
        self.blocks = BlockManager(runner.cache_config.num_blocks, runner.cache_config.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}

    # ---- request management --------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self._by_id:
            raise ValueError(f"request_id={req.request_id!r} is already in the engine")
        capacity = self.blocks.capacity_blocks * self.blocks.block_size
        if req.prompt_len + req.sampling.max_tokens > capacity:
            raise ValueError(
                f"prompt_len={req.prompt_len} + max_tokens={req.sampling.max_tokens} exceeds the KV pool "
                f"({capacity} tokens)"
            )
        self._by_id[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it is; its blocks are freed. Returns False if unknown."""
        req = self._by_id.get(request_id)
        if req is None:
            return False
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        req.finish_reason = FinishReason.CANCELLED
        self._finish(req, time.perf_counter())
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, req: Request, now: float) -> None:
        self.blocks.free(req.request_id)
        req.status = Status.FINISHED
        req.lifecycle.finish = now
        self._by_id.pop(req.request_id, None)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one prefill or decode batch; returns the requests that finished in it."""
        room = self.cfg.max_num_seqs - len(self.running)
        batch = pick_prefill_batch(self.waiting, self.blocks, self.cfg, max_seqs=room) if room > 0 else []
        if batch:
            start = time.perf_counter()
            for r in batch:
                r.lifecycle.prefill_start = r.lifecycle.prefill_start or start
            tokens = self.runner.prefill([Chunk(r, 0, r.num_tokens) for r in batch], [self.blocks.block_table(r.request_id) for r in batch])
            now = time.perf_counter()
            for r in batch:
                r.lifecycle.prefill_end = now
                r.lifecycle.decode_start = r.lifecycle.decode_start or now
                r.status = Status.RUNNING
            return self._record(batch, tokens, now, newly_prefilled=True)
        if not self.running:
            return []
        batch, preempted = pick_decode_batch(self.running, self.blocks, self.cfg)
        self.waiting.extendleft(reversed(preempted))
        if not batch:
            return []
        tokens = self.runner.decode(batch, [self.blocks.block_table(r.request_id) for r in batch])
        return self._record(batch, tokens, time.perf_counter(), newly_prefilled=False)

    def _record(self, batch: list[Request], tokens, now: float, newly_prefilled: bool) -> list[Request]:
        finished = []
        for r, tok in zip(batch, tokens):
            if r.append_token(int(tok), now):
                if r in self.running:
                    self.running.remove(r)
                self._finish(r, now)
                finished.append(r)
            elif newly_prefilled:
                self.running.append(r)
        return finished
