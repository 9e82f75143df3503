"""Which requests run next: FCFS prefill batching and continuous decode batching.

Plain Python over `Request` records and a `BlockManager` (no device code): the engine hands the
chosen batch to a runner and reports the sampled tokens back. The same two policies serve every
mode: a disaggregated prefill instance uses `pick_prefill_batch`, a decode instance
`pick_decode_batch`, and a colocated instance both (prefill first, as vLLM does).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque

from dsjax.engine.block_manager import BlockManager, blocks_for
from dsjax.engine.policies import prefill_batch_count
from dsjax.engine.request import Request, Status


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """`max_prefill_tokens` is DistServe's L_m: prompts are batched until their total length
    reaches it (a longer prompt runs alone). `max_num_seqs` caps a decode batch. `max_model_len`
    caps prompt + output tokens of one request below the model's own context (None: the model's),
    which bounds the KV a request can hold and the program shapes a server compiles.
    `overlap_decode`: a decode instance dispatches each decode step behind the one in flight where
    the runner can (dsjax/engine/disaggregated.py `DecodeInstance`). Colocated engines take no
    prompts into a queued step, so they overlap only when built with `overlap=True`."""

    max_num_seqs: int = 32
    max_prefill_tokens: int = 1024
    max_prefill_seqs: int = 16
    max_model_len: int | None = None
    overlap_decode: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefill_tokens", "max_prefill_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2 (a prompt token and an output token)")

    def context_len(self, model_max: int) -> int:
        """Tokens one request may hold: the model's context, or max_model_len if shorter."""
        return model_max if self.max_model_len is None else min(model_max, self.max_model_len)


def pick_prefill_batch(
    waiting: deque[Request], blocks: BlockManager, cfg: SchedulerConfig, max_seqs: int | None = None
) -> list[Request]:
    """Pop an FCFS prefix of `waiting` that fits the token budget, the free blocks and `max_seqs`
    (room left in a colocated decode batch), allocating each chosen request's blocks.
    Head-of-line order is kept: no request overtakes another."""
    limit = cfg.max_prefill_seqs if max_seqs is None else min(cfg.max_prefill_seqs, max_seqs)
    bs = blocks.block_size
    head = list(itertools.islice(waiting, max(0, limit)))
    count = prefill_batch_count(
        [r.num_tokens for r in head], token_budget=cfg.max_prefill_tokens, max_batch_size=limit,
        free_kv_tokens=blocks.num_free_blocks * bs, kv_tokens=[blocks_for(r.num_tokens, bs) * bs for r in head],
    )
    batch = [waiting.popleft() for _ in range(count)]
    for req in batch:
        blocks.allocate(req.request_id, req.num_tokens)
    return batch


def pick_decode_batch(running: list[Request], blocks: BlockManager, cfg: SchedulerConfig,
                      ahead: frozenset[int] = frozenset()) -> tuple[list[Request], list[Request]]:
    """Choose up to max_num_seqs running requests (oldest first) and make room for the token each
    writes this step. When blocks run out, the newest running request is preempted (its blocks
    freed, to be recomputed) until the rest fit. Returns (batch, preempted); `running` is updated.

    `ahead`: id() of the requests whose previous step is still in flight (an overlapped decode,
    dsjax/engine/disaggregated.py): each holds one token more than its record shows, so this step
    writes one position further, and a request whose in-flight token is its last by length
    (max_tokens) sits this step out, since it will have finished by then."""
    preempted: list[Request] = []
    gone: set[int] = set()  # id() of the preempted: set lookups keep a step O(batch), not O(batch^2)
    batch: list[Request] = []
    for req in list(running):  # a copy: preemption pops from `running`
        if len(batch) == cfg.max_num_seqs:
            break
        if id(req) in gone:  # preempted while making room for an older request
            continue
        pending = id(req) in ahead
        if pending and len(req.output_token_ids) + 1 >= req.sampling.max_tokens:
            continue
        tokens = req.num_tokens + pending
        need = blocks.blocks_needed_to_grow(req.request_id, tokens)
        while need > blocks.num_free_blocks and running:
            victim = running.pop()
            blocks.free(victim.request_id)
            victim.status = Status.WAITING
            victim.lifecycle.num_preemptions += 1
            preempted.append(victim)
            gone.add(id(victim))
            if victim is req:
                break
        if id(req) in gone:
            continue
        blocks.grow(req.request_id, tokens)
        batch.append(req)
    batch = [r for r in batch if id(r) not in gone]
    return batch, preempted
