"""Compile every program shape a server can meet before it takes traffic (`--warmup-shapes`).

The programs are compiled per padded shape (dsjax/engine/shapes.py). A shape met for the first time
inside a served step stalls that step by its compilation: 0.3–0.5 s for a plain prefill or decode
program on one CPU core (2–3 s for a fused mixed step), and every request in the batch loses its
TPOT for it. Like JetStream's ahead-of-time warm-up of prefill buckets, `warm_shapes` runs each
reachable shape once at start-up on a padding-only batch, so a served step only ever runs programs
that are already compiled; with the persistent compilation cache a restart loads them from disk.

Reachable shapes, given the scheduler's limits (L = max_prefill_tokens, S = max_prefill_seqs,
N = max_num_seqs, MB_max = blocks of the longest context):

    prefill (T, B, MB): batches within the budget: T = 16 .. next_pow2(L), B = 1 .. min(S, T),
                        MB = 1 .. next_pow2(ceil(T / block_size)) (the longest prompt has at
                        most T tokens; with `prefix`, chunks after a cached prefix: up to MB_max);
                        a prompt longer than L runs alone: T = 2 next_pow2(L) .. next_pow2(max
                        context), B = 1, MB = T / block_size
    decode (B, MB):     B = 1 .. next_pow2(N), MB = m .. next_pow2(MB_max), m the runner's
                        decode_min_blocks (the whole context on the XLA path: one MB)

    feed (B_prev, B):   an overlapped decode step's input tokens gathered from the step in flight
                        (dsjax/runtime/runner.py `feed_tokens`): every pair of decode batch
                        buckets, on one-stage runners (with pp stages the micro-batches' outputs
                        come in more combinations; those compile when first met, ~50 ms each
                        on one CPU core)

A padding-only batch (no real request: every token writes the null block's slot 0, every length
is 0, every block table points at the null block) runs the same compiled program as a real batch
of that shape and changes no real block.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from dsjax.engine import shapes
from dsjax.runtime.sampling import SamplingArrays
from models.attention import DecodeMeta, PrefillMeta


def _pow2_range(lo: int, hi: int) -> list[int]:
    out, n = [], shapes.next_pow2(lo)
    while n <= hi:
        out.append(n)
        n *= 2
    return out


def prefill_shapes(*, max_prefill_tokens: int, max_prefill_seqs: int, max_context: int, block_size: int,
                   prefix: bool = False) -> list[tuple[int, int, int]]:
    """(T, B, MB) of every prefill program the scheduler can run (module docstring)."""
    mb_max = shapes.next_pow2(-(-max_context // block_size))
    t_budget = shapes.next_pow2(max_prefill_tokens, 16)
    out = []
    for t in _pow2_range(16, t_budget):
        top = mb_max if prefix else min(mb_max, shapes.next_pow2(-(-t // block_size)))
        for b in _pow2_range(1, min(shapes.next_pow2(max_prefill_seqs), t)):
            out += [(t, b, mb) for mb in _pow2_range(1, top)]
    for t in _pow2_range(2 * t_budget, shapes.next_pow2(max_context, 16)):
        out.append((t, 1, min(mb_max, shapes.next_pow2(-(-t // block_size)))))
    return out


def decode_shapes(*, max_num_seqs: int, max_context: int, block_size: int, min_blocks: int = 1) -> list[tuple[int, int]]:
    """(B, MB) of every decode program the scheduler can run on tables at least `min_blocks` wide."""
    mb_max = shapes.next_pow2(-(-max_context // block_size), min_blocks)
    return [(b, mb) for b in _pow2_range(1, shapes.next_pow2(max_num_seqs)) for mb in _pow2_range(min_blocks, mb_max)]


def _padding_prefill(t: int, b: int, mb: int, fresh: bool = False):
    meta = PrefillMeta(positions=np.zeros(t, np.int32), slots=np.zeros(t, np.int32),
                       block_tables=np.zeros((b, mb), np.int32), cu_q_lens=np.zeros(b + 1, np.int32),
                       kv_lens=np.zeros(b, np.int32), fresh=fresh)
    return np.zeros(t, np.int32), meta, SamplingArrays.from_requests([], b)


def _padding_decode(b: int, mb: int):
    meta = DecodeMeta(positions=np.zeros(b, np.int32), slots=np.zeros(b, np.int32),
                      block_tables=np.zeros((b, mb), np.int32), kv_lens=np.zeros(b, np.int32))
    return np.zeros(b, np.int32), meta, SamplingArrays.from_requests([], b)


def warm_shapes(runner, *, prefill: list[tuple[int, int, int]], decode: list[tuple[int, int]],
                on_shape: Callable[[int, int], None] | None = None, share: tuple[int, int] = (0, 1)) -> float:
    """Run every listed shape once on a padding-only batch (compiling it, or loading it from the
    persistent cache), and the token feeds between decode shapes; returns the seconds taken.
    `on_shape(done, total)` reports progress.

    `share` = (i, n): this process is number i of n that warm the same shapes at the same time into
    one persistent compilation cache (replicas of one placement). It starts at shape i * total / n
    and wraps around, so the n processes first compile disjoint parts of the list, then reach the
    parts the others compiled and load them from the cache (~0.8 s a program instead of ~2.4 s on
    one CPU core for opt-125m) instead of all compiling every shape."""
    from dsjax.runtime.runner import feed_tokens

    t0 = time.perf_counter()
    batches = sorted({b for b, _ in decode}) if runner.pp == 1 else []
    total = len(prefill) + len(decode) + len(batches) ** 2
    done = 0
    outs: dict[int, object] = {}  # a decode output of each batch bucket, placed as served steps' are
    jobs = [(s, False) for s in prefill] + [(s, True) for s in decode]
    jobs = _rotated(jobs, share)
    for shape, is_decode in jobs:
        packed = _padding_decode(*shape) if is_decode else _padding_prefill(*shape, fresh=runner.fresh_prefill)
        out = runner._dispatch(packed, decode=is_decode)
        np.asarray(out)  # wait: one compilation at a time
        if is_decode:
            outs.setdefault(out.shape[0], out)
        done += 1
        if on_shape is not None:
            on_shape(done, total)
    for prev in batches:
        for b in batches:
            np.asarray(feed_tokens((outs[prev],), np.zeros(b, np.int32), np.full(b, -1, np.int32)))
            done += 1
            if on_shape is not None:
                on_shape(done, total)
    return time.perf_counter() - t0


def _rotated(items: list, share: tuple[int, int]) -> list:
    i, n = share
    if not 0 <= i < n:
        raise ValueError(f"share={share}: want (i, n) with 0 <= i < n")
    start = i * len(items) // n
    return items[start:] + items[:start]


def warm_runner(runner, scheduler, *, prefill: bool = True, decode: bool = True, prefix: bool = False,
                log: Callable[[str], None] | None = None, share: tuple[int, int] = (0, 1)) -> float:
    """`warm_shapes` for the shapes `scheduler` (dsjax.engine.scheduler.SchedulerConfig) can produce on
    `runner`; `prefix` for engines that prefill chunks after a cached prefix (chunked mode)."""
    context = scheduler.context_len(runner.model.config.max_position)
    pre = prefill_shapes(max_prefill_tokens=scheduler.max_prefill_tokens, max_prefill_seqs=scheduler.max_prefill_seqs,
                         max_context=context, block_size=runner.block_size, prefix=prefix) if prefill else []
    dec = decode_shapes(max_num_seqs=scheduler.max_num_seqs, max_context=context, block_size=runner.block_size,
                        min_blocks=runner.decode_min_blocks) if decode else []
    seconds = warm_shapes(runner, prefill=pre, decode=dec, share=share)
    if log is not None:
        feeds = len({b for b, _ in dec}) ** 2 if runner.pp == 1 else 0
        log(f"warmed {len(pre)} prefill and {len(dec)} decode shapes and {feeds} token feeds in {seconds:.1f} s")
    return seconds
