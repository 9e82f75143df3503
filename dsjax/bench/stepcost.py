"""Step costs of the three kinds of engine step, on the engine's own programs (for docs/results.md).

    taskset -c 0 python -m dsjax.bench.stepcost [--model small-llama]

Times `ModelRunner.prefill` / `ModelRunner.decode` (host packing, dispatch, program, sampled tokens
back) for: a prefill batch alone, a decode batch alone (the decode program), the same decodes sent
through the prefill program (how a chunked-prefill step carries them), and decodes plus a prompt
chunk in one step (a chunked-prefill step). Median of `--reps` runs after one untimed run. Imports
jax (this is the one benchmark module that does; the load generator never imports it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SCENARIOS = (
    # (label, number of decodes, their context, prompt chunk tokens)
    ("prefill 1 x 128", 0, 0, 128),
    ("prefill 1 x 256", 0, 0, 256),
    ("decode program, 8 x ctx 250", 8, 250, -1),
    ("decode program, 16 x ctx 250", 16, 250, -1),
    ("prefill program, 8 decodes x ctx 250", 8, 250, 0),
    ("prefill program, 8 decodes x ctx 250 + 128-token chunk", 8, 250, 128),
    ("prefill program, 16 decodes x ctx 250 + 224-token chunk", 16, 250, 224),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsjax.bench.stepcost", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small-llama")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    from dsjax.engine.request import Chunk, Request
    from dsjax.engine.sampling_params import SamplingParams
    from dsjax.runtime.builder import build_runner, load_causal_lm
    from dsjax.runtime.kv_cache import CacheConfig

    model, params = load_causal_lm(args.model, dtype="float32", dummy_weights=True, seed=0, backend="xla")
    runner = build_runner(model, params, CacheConfig(num_blocks=2048, block_size=16))
    rng = np.random.default_rng(0)
    greedy = SamplingParams(max_tokens=1 << 20, temperature=0.0)
    next_block = [1]

    def request(prompt_len: int, num_output: int) -> tuple[Request, list[int]]:
        ids = rng.integers(0, 256, prompt_len + num_output).tolist()
        req = Request(request_id="step", prompt_token_ids=ids[:prompt_len], sampling=greedy, seed=0)
        req.output_token_ids = ids[prompt_len:]
        blocks = -(-(prompt_len + num_output) // 16)
        table = list(range(next_block[0], next_block[0] + blocks))
        next_block[0] += blocks
        return req, table

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    print(f"| step ({args.model}, one core) | ms |\n|---|---|")
    for label, num_decodes, ctx, chunk in SCENARIOS:
        next_block[0] = 1
        decodes = [request(ctx, 1) for _ in range(num_decodes)]
        if chunk < 0:  # the decode program
            reqs, tables = [r for r, _ in decodes], [t for _, t in decodes]
            ms = median_ms(lambda: runner.decode(reqs, tables))
        else:
            chunks = [Chunk(r, r.num_tokens - 1, r.num_tokens) for r, _ in decodes]
            tables = [t for _, t in decodes]
            if chunk:
                prompt, table = request(chunk, 0)
                chunks.append(Chunk(prompt, 0, chunk))
                tables.append(table)
            nd = num_decodes if chunk else 0  # decodes alone (chunk 0): the prefill program
            ms = median_ms(lambda: runner.prefill(chunks, tables, num_decodes=nd))
        print(f"| {label} | {ms:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
