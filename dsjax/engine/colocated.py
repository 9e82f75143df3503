"""A colocated instance: both phases on one model replica, two policies.

- prefill-first (vLLM-style): a step is either a prefill batch, when prompts wait and fit, or a
  decode step of every running request;
- chunked prefill (Sarathi, vLLM's default today): every step carries all running decodes (one
  token each) and fills the rest of a token budget with a chunk of the oldest waiting prompt. A
  decode token is a chunk of length one, so the mixed batch can be one call of the prefill
  program, whose attention handles the decodes apart from the prompt chunks (the split layout of
  models/attention.py): "fused", the default with the Pallas kernels; on the XLA path the step
  runs the decode program and the prefill program back to back instead (`fused_mixed_steps`).
  A step with no prompt chunk runs the decode program.


A prefill-first step is: pick a batch, run it, record the tokens:

    batch = pick_prefill_batch(...) or pick_decode_batch(...)
    tokens = runner.prefill(...) / runner.decode(...)
    finished = [r for r, t in zip(batch, tokens) if r.append_token(t, now)]

Prefill batches take priority, so a new prompt delays the running decodes by one prefill; chunking
bounds that delay but slows every step that carries a chunk. That interference is exactly what
disaggregation removes.

Decode steps run one at a time by default. With `overlap=True` prefill-first decode steps overlap
as a decode instance's do (dsjax/engine/disaggregated.py `DecodeInstance`): a decode step is
dispatched behind the one in flight and that one is recorded after, so the host's work between
steps runs while the device computes. The price is TTFT: a prompt arriving during a step then
waits for that step *and* the one already queued behind it (a dispatched step cannot be taken
back), up to one decode step more than vLLM's prefill-first engine and the simulator, whose
semantics the colocated baselines stand for. A step that would be a prefill first records the step
in flight (judged as if its length-ending requests had left), so the prefill sees their blocks
free. Chunked steps always run one at a time.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from dsjax.engine.block_manager import BlockManager, blocks_for
from dsjax.engine.policies import chunked_prefill_plan, colocated_runs_prefill, least_loaded
from dsjax.engine.request import Chunk, FinishReason, Request, Status
from dsjax.engine.runner_interface import Runner
from dsjax.engine.scheduler import SchedulerConfig, pick_decode_batch, pick_prefill_batch


class ColocatedEngine:
    def __init__(self, runner: Runner, scheduler: SchedulerConfig, chunked: bool = False,
                 fused_mixed_steps: bool | None = None, overlap: bool = False):
        self.runner = runner
        self.cfg = scheduler
        self.chunked = chunked
        # A chunked step with decodes and prompt chunks runs as one prefill-program call (fused) or
        # as the decode program then the prefill program, dispatched back to back in the same step
        # (same tokens). Default: what the runner prefers (fused with the Pallas kernels).
        self.fused_mixed_steps = runner.fuses_mixed_steps if fused_mixed_steps is None else fused_mixed_steps
        self._computed: dict[str, int] = {}  # chunked mode: prompt tokens already in the cache
        self.blocks = BlockManager(runner.cache_config.num_blocks, runner.cache_config.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self.overlap = overlap = bool(overlap) and getattr(runner, "overlaps_decode", False)
        if overlap and chunked:
            raise ValueError("overlapped decode steps need the prefill-first policy (chunked=False)")
        self.inflight: tuple[list[Request], object] | None = None  # a decode step dispatched, not yet recorded

    # ---- request management --------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self._by_id:
            raise ValueError(f"request_id={req.request_id!r} is already in the engine")
        capacity = self.blocks.capacity_blocks * self.blocks.block_size
        if req.peak_tokens > capacity:
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
        self._computed.pop(request_id, None)
        req.finish_reason = FinishReason.CANCELLED
        self._finish(req, time.perf_counter())
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running) or self.inflight is not None

    def _finish(self, req: Request, now: float) -> None:
        self.blocks.free(req.request_id)
        req.status = Status.FINISHED
        req.lifecycle.finish = now
        self._by_id.pop(req.request_id, None)

    # ---- one step ------------------------------------------------------------------------
    def load(self) -> int:
        return sum(r.num_tokens for r in self.running) + sum(r.num_tokens for r in self.waiting)

    def step(self) -> list[Request]:
        """Run one batch; returns the requests that finished in it."""
        if self.chunked:
            return self._chunked_step()
        finished = []
        if self.inflight is not None and self._prefill_next():
            finished = self._record_inflight()  # the prefill runs after it, as it would without overlap
        room = self.cfg.max_num_seqs - len(self.running)
        batch = pick_prefill_batch(self.waiting, self.blocks, self.cfg, max_seqs=room) if room > 0 and self._prefill_first() else []
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
            return finished + self._record(batch, tokens, now, newly_prefilled=True)
        if not self.running:
            return finished + self._record_inflight()
        prev = self.inflight
        ahead = frozenset(map(id, prev[0])) if prev is not None else frozenset()
        batch, preempted = pick_decode_batch(self.running, self.blocks, self.cfg, ahead=ahead)
        self.waiting.extendleft(reversed(preempted))
        tables = [self.blocks.block_table(r.request_id) for r in batch]
        if not self.overlap:
            if not batch:
                return []
            tokens = self.runner.decode(batch, tables)
            return self._record(batch, tokens, time.perf_counter(), newly_prefilled=False)
        after = prev if not ahead.isdisjoint(map(id, batch)) else None
        self.inflight = (batch, self.runner.launch_decode(batch, tables, after=after)) if batch else None
        return self._record_step(prev)

    def _record_inflight(self) -> list[Request]:
        """Wait for the decode step in flight, if any, and record it."""
        prev, self.inflight = self.inflight, None
        return self._record_step(prev)

    def _record_step(self, launched: tuple[list[Request], object] | None) -> list[Request]:
        """Wait for a dispatched decode step (batch, launch), if any, and record its tokens."""
        if launched is None:
            return []
        batch, handles = launched
        return self._record(batch, np.concatenate(self.runner.collect(handles)), time.perf_counter(), newly_prefilled=False)

    def _prefill_first(self, freed_blocks: int = 0) -> bool:
        """vLLM's rule (the simulator's too): a prefill step whenever the oldest prompt fits."""
        bs = self.blocks.block_size
        head_blocks = blocks_for(self.waiting[0].num_tokens, bs) if self.waiting else 0
        return colocated_runs_prefill(num_waiting=len(self.waiting), head_need_tokens=head_blocks * bs,
                                      free_tokens=(self.blocks.num_free_blocks + freed_blocks) * bs)

    def _prefill_next(self) -> bool:
        """Whether a prefill follows the decode step in flight, judged as if it were recorded: its
        requests that end by length leave the batch and free their blocks. (An end on an EOS is
        not known in advance; a prompt that only its blocks let in waits one decode step more.)"""
        live = set(map(id, self.running))
        ending = [r for r in self.inflight[0] if id(r) in live and len(r.output_token_ids) + 1 >= r.sampling.max_tokens]
        room = self.cfg.max_num_seqs - len(self.running) + len(ending)
        return room > 0 and self._prefill_first(sum(len(self.blocks.block_table(r.request_id)) for r in ending))

    def _record(self, batch: list[Request], tokens, now: float, newly_prefilled: bool) -> list[Request]:
        """Append each request's token; a decode step's request no longer running (aborted or
        preempted while an overlapped step was in flight, or ended by a stop id the step before)
        gets nothing."""
        finished = []
        live = None if newly_prefilled else set(map(id, self.running))
        for r, tok in zip(batch, tokens):
            if live is not None and id(r) not in live:
                continue
            if r.append_token(int(tok), now):
                if r in self.running:
                    self.running.remove(r)
                self._finish(r, now)
                finished.append(r)
            elif newly_prefilled:
                self.running.append(r)
        return finished

    def _chunked_step(self) -> list[Request]:
        decode_batch, preempted = pick_decode_batch(self.running, self.blocks, self.cfg) if self.running else ([], [])
        for r in preempted:
            self._computed.pop(r.request_id, None)
        self.waiting.extendleft(reversed(preempted))
        chunks = [Chunk(r, r.num_tokens - 1, r.num_tokens) for r in decode_batch]
        # Fill the rest of the token budget with chunks of waiting prompts, oldest first (the
        # simulator's `chunked_prefill_plan`); a prompt's blocks are allocated whole when its first
        # chunk is scheduled, and a prompt that does not fit stops the fill (no overtaking).
        room = self.cfg.max_num_seqs - len(self.running)
        head = list(self.waiting)[: max(0, room)]
        sizes = chunked_prefill_plan(
            num_decodes=len(decode_batch), token_budget=self.cfg.max_prefill_tokens,
            remaining_prompt=[r.num_tokens - self._computed.get(r.request_id, 0) for r in head],
        )
        prefilling: list[Request] = []
        for req, size in zip(head, sizes):
            rid = req.request_id
            if rid not in self._computed:
                if not self.blocks.can_allocate(req.num_tokens):
                    break
                self.blocks.allocate(rid, req.num_tokens)
                self._computed[rid] = 0
            done = self._computed[rid]
            chunks.append(Chunk(req, done, done + size))
            prefilling.append(req)
        if not chunks:
            return []
        tables = [self.blocks.block_table(c.request.request_id) for c in chunks]
        if not prefilling:  # decodes only: the decode program, same tokens at a fraction of the cost
            tokens = self.runner.decode(decode_batch, tables)
            return self._record(decode_batch, tokens, time.perf_counter(), newly_prefilled=False)
        start = time.perf_counter()
        for r in prefilling:
            r.lifecycle.prefill_start = r.lifecycle.prefill_start or start
        nd = len(decode_batch)
        if nd and not self.fused_mixed_steps:
            launched = self.runner.launch_decode(decode_batch, tables[:nd])
            launched += self.runner.launch_prefill([(chunks[nd:], tables[nd:])])
            tokens = np.concatenate(self.runner.collect(launched))
        else:
            tokens = self.runner.prefill(chunks, tables, num_decodes=nd)
        now = time.perf_counter()
        finished = self._record(decode_batch, tokens[: len(decode_batch)], now, newly_prefilled=False)
        completed, completed_tokens = [], []
        for c, tok in zip(chunks[len(decode_batch):], tokens[len(decode_batch):]):
            rid = c.request.request_id
            self._computed[rid] = c.end
            if c.end == c.request.num_tokens:  # last chunk: its sampled token is the first output
                del self._computed[rid]
                self.waiting.remove(c.request)
                c.request.lifecycle.prefill_end = now
                c.request.lifecycle.decode_start = c.request.lifecycle.decode_start or now
                c.request.status = Status.RUNNING
                completed.append(c.request)
                completed_tokens.append(tok)
        return finished + self._record(completed, completed_tokens, now, newly_prefilled=True)


class ReplicatedEngine:
    """Independent colocated replicas; each request goes to the least-loaded one."""

    def __init__(self, engines: list[ColocatedEngine]):
        self.engines = engines

    def add_request(self, req: Request) -> None:
        self.engines[least_loaded([e.load() for e in self.engines])].add_request(req)

    def abort(self, request_id: str) -> bool:
        return any(e.abort(request_id) for e in self.engines)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    def step(self) -> list[Request]:
        return [r for e in self.engines for r in e.step()]
