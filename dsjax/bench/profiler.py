"""Engine profiler: time our engine's jitted prefill and decode programs, fit DistServe's forms.

    python -m dsjax.plan profile --model small-llama --tp 1,2 --out profile.json [--quick]

A benchmark, not part of the planner: it runs the real runtime (jax), and writes the profile the
planner reads (`dsjax.plan` imports this module only for the `profile` command). For every TP degree it builds a
`ModelRunner` (unsharded for tp=1 and pp=1, else on tp * pp devices: `dsjax.runtime.builder.build_runner`),
runs every grid shape once to compile it, then times all shapes in `reps` interleaved rounds (a
slow spell of a shared machine then hits every shape alike) and keeps each shape's median. A run
is what the engine pays per step: `ModelRunner.prefill` / `ModelRunner.decode`, i.e. host packing,
dispatch, the program, and the copy of the sampled tokens to the host (which waits for the
program; the KV pool is an output of the same program).

Grid points are aligned with the engine's shape buckets (dsjax/engine/shapes.py): prompts and contexts
whose block counts are powers of two and batches of powers of two, so a measured batch runs
exactly its own shape and no padding. Any other batch runs the next bucket up and costs what that
bucket costs; the profile records the buckets (`metadata.shape_buckets`) and the planner's latency
model then costs simulated batches at their padded shapes (`buckets.ShapeBuckets`).

Also measured, for deriving benchmark SLOs: a 512-token prefill at batch 1 (`prefill_512_ms`)
and one decode step at batch 1 after a 512-token prompt (`decode_bs1_ctx512_ms`: 513 keys, so the
64-block bucket).

Tensor parallelism on a CPU needs fake devices: XLA_FLAGS=--xla_force_host_platform_device_count=N
before jax is imported (`python -m dsjax.plan profile` sets it when tp * pp > 1 and it is unset).
Fake devices share the host's cores, so such a profile measures sharding overhead, not speed-up.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dsjax.engine.placement import PhaseParallel
from dsjax.engine.request import Chunk, Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.fitting import fit_profile, relative_errors
from dsjax.planner.latency import LatencyCoeffs, Profile
from dsjax.planner.model_spec import canonical_model_name
from dsjax.runtime.builder import build_runner, load_causal_lm
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.runner import ModelRunner

Point = tuple[int, int]  # (batch size, prompt length) for prefill, (batch size, context length) for decode
ISOLATED_PREFILL: Point = (1, 512)
ISOLATED_DECODE: Point = (1, 512)
CHEAP_SHAPE_ROUND_S = 0.05  # a shape faster than this runs several times per round (up to 5)


def _pow2_lengths(lo: int, hi: int, step: int = 2) -> list[int]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= step
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileGrid:
    """Shapes to time: prefill (batch, prompt_len) and decode (batch, context_len) points.

    A decode point (B, ctx) is B requests whose KV holds ctx tokens and that each gain one: they
    attend ctx + 1 keys, so bucket-aligned decode points have ctx + 1 = a power-of-two number of
    blocks.
    """

    prefill: tuple[Point, ...]
    decode: tuple[Point, ...]
    reps: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill", tuple((int(b), int(n)) for b, n in self.prefill))
        object.__setattr__(self, "decode", tuple((int(b), int(n)) for b, n in self.decode))
        for name, points, low in (("prefill", self.prefill, 1), ("decode", self.decode, 0)):
            bad = [p for p in points if p[0] < 1 or p[1] < low]
            if bad:
                raise ValueError(f"{name} grid points {bad} need batch >= 1 and length >= {low}")
        if len(set(self.prefill)) < 3 or len(set(self.decode)) < 3:
            raise ValueError(
                f"need >= 3 distinct prefill and decode points to fit 3 coefficients, got {len(set(self.prefill))} and {len(set(self.decode))}"
            )
        if self.reps < 1:
            raise ValueError(f"reps={self.reps} must be >= 1")

    @classmethod
    def quick(cls, *, max_len: int, block_size: int = 16, max_tokens: int = 1024, reps: int = 3) -> "ProfileGrid":
        """About 16 shapes, lengths up to min(max_len, max_tokens): under a minute for small-llama on 2 CPU cores."""
        top = min(max_len, max_tokens)
        prefill = [(1, n) for n in _pow2_lengths(block_size, top, 4) + [top // 2, top] if block_size <= n <= top]
        prefill += [(b, n) for b, n in ((2, top // 4), (4, top // 16), (8, block_size * 2)) if b * n <= top and n >= block_size]
        decode = [(b, n - 1) for b in (1, 8, 32) for n in (top // 8, top)]
        decode.append((4, top // 2 - 1))
        return cls(prefill=tuple(sorted(set(prefill))), decode=tuple(sorted(set(decode))), reps=reps)

    @classmethod
    def full(cls, *, max_len: int, block_size: int = 16, max_tokens: int = 2048, max_batch: int = 256,
             kv_token_budget: int | None = None, reps: int = 5) -> "ProfileGrid":
        """Prefill: batches 1-16 of prompts up to `max_tokens` in all; decode: batches 1-`max_batch`
        at contexts up to `max_len`, skipping those whose KV exceeds `kv_token_budget` tokens."""
        lengths = _pow2_lengths(block_size, max_len)
        prefill = [(1, n) for n in lengths if n <= max_tokens]
        prefill += [(b, n) for b in (2, 4, 8, 16) for n in lengths[::2] if b * n <= max_tokens]
        decode = [
            (b, n - 1)
            for b in _pow2_lengths(1, max_batch)
            for n in lengths[::2] + [max_len]
            if kv_token_budget is None or b * n <= kv_token_budget
        ]
        return cls(prefill=tuple(sorted(set(prefill))), decode=tuple(sorted(set(decode))), reps=reps)

    def to_json(self) -> dict[str, Any]:
        return {"prefill": [list(p) for p in self.prefill], "decode": [list(p) for p in self.decode], "reps": self.reps, "warmup": 1}


@dataclasses.dataclass
class Measurements:
    """Median milliseconds per grid point of one (model, TP) instance."""

    prefill: dict[Point, float] = dataclasses.field(default_factory=dict)
    decode: dict[Point, float] = dataclasses.field(default_factory=dict)
    isolated: dict[str, float] = dataclasses.field(default_factory=dict)

    def prefill_samples(self) -> list[tuple[list[int], float]]:
        return [([n] * b, ms) for (b, n), ms in sorted(self.prefill.items())]

    def decode_samples(self) -> list[tuple[list[int], float]]:
        return [([n] * b, ms) for (b, n), ms in sorted(self.decode.items())]


class _InstanceTimer:
    """One instance's runner plus dummy requests shaped like the grid points.

    `prefill_fn` / `decode_fn` return a zero-argument run of one shape: the engine's step call on
    fixed requests (prompt tokens random, greedy sampling), whose result is host numpy tokens.
    """

    def __init__(self, runner: ModelRunner, *, vocab_size: int, num_blocks: int, seed: int = 0):
        self.runner = runner
        self.block_size = runner.block_size
        self.num_blocks = num_blocks
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.sampling = SamplingParams(max_tokens=1 << 20, temperature=0.0)

    def _request(self, prompt_len: int, num_output: int) -> Request:
        ids = self.rng.integers(0, self.vocab_size, prompt_len + num_output).tolist()
        req = Request(request_id="profile", prompt_token_ids=ids[:prompt_len], sampling=self.sampling, seed=0)
        req.output_token_ids = ids[prompt_len:]
        return req

    def _tables(self, batch: int, num_tokens: int) -> list[list[int]]:
        """Distinct blocks per request while the pool lasts, then wrapping around (block 0 is the
        null block and never used)."""
        per = -(-num_tokens // self.block_size)
        usable = self.num_blocks - 1
        return [[1 + (i * per + j) % usable for j in range(per)] for i in range(batch)]

    def prefill_fn(self, batch: int, prompt_len: int) -> Callable[[], Any]:
        reqs = [self._request(prompt_len, 0) for _ in range(batch)]
        chunks = [Chunk(r, 0, prompt_len) for r in reqs]
        tables = self._tables(batch, prompt_len)
        return lambda: self.runner.prefill(chunks, tables)

    def decode_fn(self, batch: int, context_len: int) -> Callable[[], Any]:
        # Each request has `context_len` tokens in its KV and feeds its last sampled token.
        reqs = [self._request(context_len, 1) for _ in range(batch)]
        tables = self._tables(batch, context_len + 1)
        return lambda: self.runner.decode(reqs, tables)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()  # returns host numpy tokens, so the program has finished
    return time.perf_counter() - t0


def time_shapes(jobs: dict[Any, Callable[[], Any]], *, reps: int, bar: tqdm | None = None) -> dict[Any, float]:
    """Median milliseconds of each job, timed in interleaved rounds.

    Round 0 runs every job once untimed (compilation) and once timed; rounds 1..reps-1 time every
    job again, in the same order. Interleaving spreads a slow spell of a shared machine over all
    shapes instead of spoiling a few. A job faster than CHEAP_SHAPE_ROUND_S runs several times per
    round (up to 5), which steadies the medians of the cheap shapes. Keys are (label, batch, length).
    """
    times: dict[Any, list[float]] = {key: [] for key in jobs}
    per_round: dict[Any, int] = {}
    for round_ in range(reps):
        for key, fn in jobs.items():
            if bar is not None:
                bar.set_description(f"{key[0]} {key[1]}x{key[2]} (round {round_ + 1}/{reps})")
            if round_ == 0:
                fn()  # compile (or reuse) the shape; not timed
                first = _timed(fn)
                times[key].append(first)
                per_round[key] = max(1, min(5, int(CHEAP_SHAPE_ROUND_S / max(first, 1e-6))))
            for _ in range(per_round[key] - (1 if round_ == 0 else 0)):
                times[key].append(_timed(fn))
            if bar is not None:
                bar.update()
    return {key: float(np.median(t)) * 1e3 for key, t in times.items()}


def _pool_blocks(grid: ProfileGrid, block_size: int, bytes_per_block: int, budget_bytes: int) -> int:
    need = [b * -(-n // block_size) for b, n in grid.prefill] + [b * -(-(n + 1) // block_size) for b, n in grid.decode]
    want = max(need + [-(-(ISOLATED_DECODE[1] + 1) // block_size)]) + 1
    return max(2, min(want, budget_bytes // bytes_per_block))


def measure(
    timer: _InstanceTimer,
    grid: ProfileGrid,
    *,
    isolated: bool = True,
    bar: tqdm | None = None,
    label: str = "",
) -> Measurements:
    """Time every grid point (and the two isolated SLO latencies) on one instance."""
    jobs: dict[Any, Callable[[], Any]] = {}
    for b, n in grid.prefill:
        jobs[(f"{label}prefill", b, n)] = timer.prefill_fn(b, n)
    for b, n in grid.decode:
        jobs[(f"{label}decode", b, n)] = timer.decode_fn(b, n)
    if isolated:
        jobs.setdefault((f"{label}prefill", *ISOLATED_PREFILL), timer.prefill_fn(*ISOLATED_PREFILL))
        jobs.setdefault((f"{label}decode", *ISOLATED_DECODE), timer.decode_fn(*ISOLATED_DECODE))
    ms = time_shapes(jobs, reps=grid.reps, bar=bar)
    out = Measurements()
    out.prefill = {(b, n): ms[(f"{label}prefill", b, n)] for b, n in grid.prefill}
    out.decode = {(b, n): ms[(f"{label}decode", b, n)] for b, n in grid.decode}
    if isolated:
        out.isolated["prefill_512_ms"] = ms[(f"{label}prefill", *ISOLATED_PREFILL)]
        out.isolated["decode_bs1_ctx512_ms"] = ms[(f"{label}decode", *ISOLATED_DECODE)]
    return out


def num_jobs(grid: ProfileGrid, isolated: bool) -> int:
    extra = {("p", *ISOLATED_PREFILL), ("d", *ISOLATED_DECODE)} if isolated else set()
    return len({("p", *p) for p in grid.prefill} | {("d", *p) for p in grid.decode} | extra)


def _fit_report(coeffs: LatencyCoeffs, m: Measurements, buckets: ShapeBuckets) -> dict[str, float]:
    pre, dec = relative_errors(coeffs, prefill=m.prefill_samples(), decode=m.decode_samples(), buckets=buckets)
    both = np.abs(np.concatenate([pre, dec]))
    return {
        "prefill_mean_rel_err": float(np.abs(pre).mean()), "prefill_max_rel_err": float(np.abs(pre).max()),
        "decode_mean_rel_err": float(np.abs(dec).mean()), "decode_max_rel_err": float(np.abs(dec).max()),
        "mean_rel_err": float(both.mean()), "max_rel_err": float(both.max()),
    }


def profile_engine(
    model_name: str,
    *,
    tps: Sequence[int] = (1,),
    pp: int = 1,
    dtype: str = "float32",
    block_size: int = 16,
    grid: ProfileGrid | None = None,
    quick: bool = False,
    max_len: int | None = None,
    reps: int | None = None,
    isolated: bool = True,
    attention: str = "auto",
    kv_budget_bytes: int = 1 << 30,
    seed: int = 0,
    progress: bool = True,
) -> Profile:
    """Measure one model (preset name or HF checkpoint dir; random weights) at every TP degree and
    return the fitted profile, keyed by `canonical_model_name(model_name)`, with full metadata.

    grid: explicit shapes; else `ProfileGrid.quick` or `.full` up to the model's context length
    (or `max_len`), with `reps` timed runs per shape if given. isolated: also time the two SLO
    latencies (prefill_512_ms, decode_bs1_ctx512_ms). attention: the shape buckets' features
    (`buckets.ShapeBuckets`); "auto" is "padded" for the XLA attention path (what its time
    follows, docs/planner.md "Engine profiler") and "ragged" for the Pallas kernels. With pp > 1 the instance is a pipeline and
    its times are of the whole pipeline; the schema is keyed by TP only, so such a profile
    describes that pp (recorded in metadata.pp).
    """
    if not tps or any(tp < 1 for tp in tps) or pp < 1:
        raise ValueError(f"tps={list(tps)} and pp={pp} must be >= 1")
    t_start = time.perf_counter()
    model, params = load_causal_lm(model_name, dtype=dtype, dummy_weights=True, seed=seed)
    config, backend = model.config, model.backend
    if grid is None:
        top = config.max_position if max_len is None else min(max_len, config.max_position)
        kv_tokens = kv_budget_bytes // config.kv_bytes_per_token(jnp.dtype(model.dtype).itemsize)
        grid = (ProfileGrid.quick(max_len=top, block_size=block_size) if quick
                else ProfileGrid.full(max_len=top, block_size=block_size, kv_token_budget=kv_tokens))
    if reps is not None:
        grid = dataclasses.replace(grid, reps=reps)
    if attention == "auto":
        attention = "padded" if backend == "xla" else "ragged"
    buckets = ShapeBuckets(block_size=block_size, attention=attention)
    bytes_per_block = config.kv_bytes_per_token(jnp.dtype(model.dtype).itemsize) * block_size
    cache = CacheConfig(num_blocks=_pool_blocks(grid, block_size, bytes_per_block, kv_budget_bytes), block_size=block_size)

    entries: dict[int, LatencyCoeffs] = {}
    fits: dict[str, dict[str, float]] = {}
    by_tp_isolated: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, list[list[float]]]] = {}
    total = len(tps) * grid.reps * num_jobs(grid, isolated)
    with tqdm(total=total, disable=not progress, unit="shape", dynamic_ncols=True) as bar:
        for tp in tps:
            runner = build_runner(model, params, cache, phase=None if tp == pp == 1 else PhaseParallel(tp=tp, pp=pp))
            timer = _InstanceTimer(runner, vocab_size=config.vocab_size, num_blocks=cache.num_blocks, seed=seed)
            m = measure(timer, grid, isolated=isolated, bar=bar, label=f"tp={tp} ")
            del runner, timer
            coeffs = fit_profile(prefill=m.prefill_samples(), decode=m.decode_samples(), buckets=buckets)
            entries[tp] = coeffs
            fits[str(tp)] = _fit_report(coeffs, m, buckets)
            by_tp_isolated[str(tp)] = m.isolated
            samples[str(tp)] = {
                "prefill": [[b, n, round(ms, 4)] for (b, n), ms in sorted(m.prefill.items())],
                "decode": [[b, n, round(ms, 4)] for (b, n), ms in sorted(m.decode.items())],
            }
    dev = jax.devices()[0]
    first = str(tps[0])
    metadata: dict[str, Any] = {
        "source": "dsjax.bench.profiler",
        "model": model_name,
        "device": dev.device_kind,
        "platform": dev.platform,
        "num_visible_devices": jax.device_count(),
        "dtype": dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "attention_backend": backend,
        "pp": pp,
        "block_size": block_size,
        "num_blocks": cache.num_blocks,
        "sampling": "greedy",
        "timing": f"median of {grid.reps} interleaved rounds over all shapes (1-5 runs per shape per round, more for "
                  "cheap shapes) after one untimed run per shape; a run is ModelRunner.prefill/decode (host packing, "
                  "dispatch, program, sampled tokens to the host)",
        "shape_buckets": buckets.to_json(),
        "grid": grid.to_json(),
        "fit": fits,
        "mean_rel_err": max(f["mean_rel_err"] for f in fits.values()),
        "max_rel_err": max(f["max_rel_err"] for f in fits.values()),
        "samples": samples,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if isolated:
        metadata |= {
            "isolated_tp": tps[0],
            "prefill_512_ms": by_tp_isolated[first]["prefill_512_ms"],
            "decode_bs1_ctx512_ms": by_tp_isolated[first]["decode_bs1_ctx512_ms"],
            "isolated": by_tp_isolated,
        }
    return Profile(entries={canonical_model_name(model_name): entries}, metadata=metadata, source="<measured>")
