"""Engine micro-benchmarks: prefill tokens/s, decode step time, in-process KV migration.

    python -m dsjax.bench engine [--model small-llama] [--dtype float32] [--reps 5]

Every shape runs once untimed (compilation) before it is timed; times are medians over `--reps`.
Migration copies a request's blocks from a prefill instance on device 0 to a decode instance on
device 1 (two fake CPU devices here: `python -m dsjax.bench engine` asks for them before jax loads) and is compared with one plain `jax.device_put` of the same
number of bytes between the same devices, measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dsjax.bench.roofline import chain_ms, measure_bandwidth_gbs, median_ms, weight_bytes
from dsjax.engine.block_manager import BlockManager
from dsjax.engine.placement import PhaseParallel
from dsjax.engine.request import Chunk, Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.runtime.builder import build_runner, load_causal_lm
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.runner import ModelRunner
from models.transformer import CausalLM
from models.weights import DTYPES

GREEDY = SamplingParams(max_tokens=1_000_000, temperature=0.0, ignore_eos=True)


def _median_time(fn, reps: int) -> float:
    return median_ms(fn, reps) / 1e3


def _requests(n: int, length: int, rng) -> list[Request]:
    return [Request(request_id=f"b{i}", prompt_token_ids=[int(x) for x in rng.integers(0, 256, length)], sampling=GREEDY, seed=0) for i in range(n)]


def bench_prefill(runner: ModelRunner, shapes, reps, rng):
    rows = []
    for n, length in tqdm(shapes, desc="prefill", leave=False):
        reqs = _requests(n, length, rng)
        bm = BlockManager(runner.cache_config.num_blocks, runner.block_size)
        tables = [bm.allocate(r.request_id, length) for r in reqs]
        chunks = [Chunk(r, 0, length) for r in reqs]
        t = _median_time(lambda: runner.prefill(chunks, tables), reps)
        rows.append({"batch": n, "prompt_len": length, "ms": 1e3 * t, "tokens_per_s": n * length / t})
    return rows


def _decode_ms(runner: ModelRunner, batch: int, context: int, reps: int, rng) -> float:
    reqs = _requests(batch, context, rng)
    bm = BlockManager(runner.cache_config.num_blocks, runner.block_size)
    tables = [bm.allocate(r.request_id, context + 1) for r in reqs]
    for r in reqs:
        r.output_token_ids.append(1)
    return median_ms(lambda: runner.decode(reqs, tables), reps)


def bench_decode(runner: ModelRunner, params, batches, context, reps, rng, bandwidth_gbs: float):
    """Decode step time beside the plain matmul chain of the same weights at the same batch and
    the bandwidth floor (weight bytes / measured bandwidth), in the same process."""
    floor_ms = weight_bytes(params) / bandwidth_gbs / 1e6
    rows = []
    for n in tqdm(batches, desc="decode", leave=False):
        step = _decode_ms(runner, n, context, reps, rng)
        chain = chain_ms(runner.model, params, n, reps)
        rows.append({"batch": n, "context": context, "step_ms": step, "plain_chain_ms": chain, "step_over_chain": step / chain,
                     "floor_ms": floor_ms, "step_over_floor": step / floor_ms, "tokens_per_s": 1e3 * n / step})
    return rows


def bench_context(runner: ModelRunner, batch, contexts, reps, rng, bandwidth_gbs: float):
    """What a token of context costs a decode step: the slope of step time between two contexts
    at one batch, per token of the batch's context, against the floor of reading that token's K
    and V once (all layers) at the measured bandwidth."""
    cfg = runner.model.config
    kv_floor_us = cfg.kv_bytes_per_token(jnp.dtype(runner.model.dtype).itemsize) / bandwidth_gbs / 1e3
    lo, hi = contexts
    t_lo, t_hi = (_decode_ms(runner, batch, c, reps, rng) for c in tqdm(contexts, desc="context", leave=False))
    us = 1e3 * (t_hi - t_lo) / (batch * (hi - lo))
    return [{"batch": batch, "contexts": f"{lo} -> {hi}", "step_ms": f"{t_lo:.1f} -> {t_hi:.1f}",
             "us_per_context_token": us, "kv_floor_us": kv_floor_us, "over_floor": us / kv_floor_us}]


def bench_migration(model: CausalLM, params, cache: CacheConfig, lengths, reps):
    devs = jax.devices()
    if len(devs) < 2:
        return []
    src = build_runner(model, params, cache, phase=PhaseParallel(), devices=[devs[0]])
    dst = build_runner(model, params, cache, phase=PhaseParallel(), devices=[devs[1]])
    rows = []
    for length in tqdm(lengths, desc="migration", leave=False):
        nblk = -(-length // cache.block_size)
        src_table, dst_table = list(range(1, nblk + 1)), list(range(1, nblk + 1))
        t_mig = _median_time(lambda: dst.pull_kv(src, src_table, dst_table), reps)
        nbytes = model.config.kv_bytes_per_token(jnp.dtype(model.dtype).itemsize) * nblk * cache.block_size
        blob = jax.device_put(np.zeros(nbytes // 4, np.float32), devs[0])
        t_put = _median_time(lambda: jax.device_put(blob, devs[1]).block_until_ready(), reps)
        rows.append({"tokens": length, "bytes": nbytes, "migrate_ms": 1e3 * t_mig, "device_put_ms": 1e3 * t_put,
                     "us_per_token": 1e6 * t_mig / length, "ratio": t_mig / t_put})
    return rows


def bench_interference(model: CausalLM, params, cache: CacheConfig, *, n_decode=8, decode_tokens=192,
                       long_prompt=1024, n_long=4, gap_s=0.1):
    """Decode inter-token latency of short requests while long prompts keep arriving: colocated
    (prefill first), disaggregated driven by one loop, and disaggregated with a thread per
    instance (prefill on device 0, decode on device 1)."""
    from dsjax.engine.placement import Placement
    from dsjax.engine.scheduler import SchedulerConfig
    from dsjax.engine.threaded import ThreadedDisaggEngine
    from dsjax.runtime.builder import build_engine

    sched = SchedulerConfig(max_num_seqs=16, max_prefill_tokens=1024)
    rng = np.random.default_rng(1)
    rows = []
    setups = [("colocated", "colocated", None, False),
              ("disaggregated, one loop", "disaggregated", Placement(), False),
              ("disaggregated, threaded", "disaggregated", Placement(), True)]
    for name, mode, placement, threaded in tqdm(setups, desc="interference", leave=False):
        engine = build_engine(model, params, placement=placement, mode=mode, cache=cache, scheduler=sched)
        for warm in (True, False):  # the first pass compiles every shape, the second is timed
            sp = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
            short = [Request(request_id=f"s{i}{warm}", prompt_token_ids=[int(x) for x in rng.integers(0, 256, 32)], sampling=sp, seed=0) for i in range(n_decode)]
            longs = [Request(request_id=f"l{i}{warm}", prompt_token_ids=[int(x) for x in rng.integers(0, 256, long_prompt)],
                             sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), seed=0) for i in range(n_long)]
            driver = ThreadedDisaggEngine(engine).start() if threaded else engine
            for r in short:
                driver.add_request(r)
            t0 = time.perf_counter()
            pending = list(longs)
            while driver.has_unfinished() or pending:
                now = time.perf_counter() - t0
                while pending and now >= gap_s * (n_long - len(pending) + 1):
                    driver.add_request(pending.pop(0))
                if threaded:
                    time.sleep(0.002)
                else:
                    driver.step()
            if threaded:
                driver.stop()
        gaps = np.concatenate([np.diff(r.lifecycle.token_times) for r in short])
        rows.append({"setup": name, "tpot_mean_ms": 1e3 * float(gaps.mean()), "itl_p50_ms": 1e3 * float(np.percentile(gaps, 50)),
                     "itl_p99_ms": 1e3 * float(np.percentile(gaps, 99)), "itl_max_ms": 1e3 * float(gaps.max())})
    return rows


def _table(rows) -> str:
    if not rows:
        return "(not run)\n"
    keys = list(rows[0])
    fmt = lambda v: f"{v:,.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dsjax.bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-llama")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size (rows per block) of the benchmarked pool")
    ap.add_argument("--only", choices=["prefill", "decode", "context", "migration", "interference"], help="run one section")
    args = ap.parse_args(argv)
    model, weights = load_causal_lm(args.model, dtype=args.dtype, dummy_weights=True, backend="xla")
    params = weights.load()  # one tree on the default device: the plain chain and the weight bytes read it
    config = model.config
    cache = CacheConfig(num_blocks=35_200 // args.block_size, block_size=args.block_size)  # 35,200 tokens at any block size
    runner = build_runner(model, params, cache)
    rng = np.random.default_rng(0)
    prefill_shapes = [(1, 128), (1, 512), (4, 128)] if args.quick else [(1, 128), (1, 512), (1, 1024), (4, 128), (8, 128), (4, 512)]
    decode_batches = [1, 16] if args.quick else [1, 8, 16, 32]
    print(f"# {args.model} ({config.num_params() / 1e6:.1f}M params, {args.dtype}) on {jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    want = lambda name: args.only in (None, name)  # noqa: E731
    if want("prefill"):
        print("## Prefill\n" + _table(bench_prefill(runner, prefill_shapes, args.reps, rng)))
    if want("decode") or want("context"):
        bandwidth = measure_bandwidth_gbs()
        print(f"memory bandwidth (one jitted sum over 256 MiB): {bandwidth:.1f} GB/s; weights {weight_bytes(params) / 1e6:.0f} MB\n")
    if want("decode"):
        print("## Decode vs the plain matmul chain and the bandwidth floor (context 8)\n"
              + _table(bench_decode(runner, params, decode_batches, 8, args.reps, rng, bandwidth)))
    if want("context"):
        print("## Decode cost per token of context (batch 16)\n"
              + _table(bench_context(runner, 16, (256, 1024), args.reps, rng, bandwidth)))
    if want("migration"):
        print("## In-process KV migration (device 0 -> device 1) vs one device_put of the same bytes\n"
              + _table(bench_migration(model, params, cache, [64, 512, 1024] if not args.quick else [512], args.reps)))
    if want("interference"):
        print("## Decode inter-token latency of 8 requests x 192 tokens while four 1024-token prompts arrive every 100 ms\n"
              + _table(bench_interference(model, params, CacheConfig(num_blocks=600, block_size=16))))


if __name__ == "__main__":
    main()
