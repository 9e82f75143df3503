"""The cost of a front: one server measured through its gRPC `Generate` and its OpenAI HTTP API,
side by side, in alternating rounds at the same loads (so drift of a shared machine hits both).

    python -m dsjax.serve --model small-llama &                     # gRPC :50051, HTTP :8000
    python -m dsjax.bench fronts --grpc localhost:50051 --http http://localhost:8000 \\
        --workload sharegpt --num-requests 100 --scale 8 --rates 10,inf --rounds 3

Per (front, rate): output tokens/s over the run (first send to last token), inter-token latency
p50/p99 and TTFT p50, each the median over rounds with the spread; and the HTTP/gRPC ratios.
`inf` sends every request at once (the server's capacity). docs/serving.md has the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from dsjax.bench.loadgen import run_load, send_schedule
from dsjax.bench.metrics import inter_token_latencies_s, percentiles, throughput, ttft_s
from dsjax.bench.prompts import load_bench_requests
from dsjax.workloads.loader import WORKLOAD_NAMES


def measure(run) -> dict[str, float]:
    records = run.records
    gaps = [g for r in records for g in inter_token_latencies_s(r)]
    itl = percentiles(gaps, (50, 99))
    firsts = [t for r in records if (t := ttft_s(r)) is not None]
    return {"tokens_per_s": throughput(records).output_token_rate, "itl_p50_ms": 1e3 * itl["p50"],
            "itl_p99_ms": 1e3 * itl["p99"], "ttft_p50_ms": 1e3 * percentiles(firsts, (50,))["p50"],
            "failed": sum(not r.ok for r in records)}


def compare_fronts(targets: dict[str, str], requests, rates, rounds: int, seed: int = 0) -> list[dict]:
    """Rows of (front, rate, metric medians and spreads), fronts alternating within every round."""
    samples: dict[tuple[str, float], list[dict]] = {}
    for rnd in range(rounds):
        for rate in rates:
            offsets = [0.0] * len(requests) if math.isinf(rate) else send_schedule(len(requests), rate=rate, seed=seed)
            order = list(targets.items()) if rnd % 2 == 0 else list(targets.items())[::-1]
            for name, target in order:
                run = run_load(target, requests, offsets, rate=rate, tag=f"{name}-r{rnd}", progress=True)
                samples.setdefault((name, rate), []).append(measure(run))
    rows = []
    for (name, rate), ms in samples.items():
        row = {"front": name, "rate": rate, "rounds": len(ms), "failed": sum(m["failed"] for m in ms)}
        for key in ("tokens_per_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms"):
            values = [m[key] for m in ms]
            row[key] = statistics.median(values)
            row[f"{key}_spread"] = [min(values), max(values)]
        rows.append(row)
    return rows


def ratios(rows: list[dict], base: str = "grpc", other: str = "http") -> list[dict]:
    by = {(r["front"], r["rate"]): r for r in rows}
    out = []
    for (front, rate), r in by.items():
        if front == other and (base, rate) in by:
            b = by[(base, rate)]
            out.append({"rate": rate, **{f"{k}_ratio": r[k] / b[k] for k in ("tokens_per_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms")}})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| front | rate (req/s) | output tokens/s | ITL p50 (ms) | ITL p99 (ms) | TTFT p50 (ms) | failed |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["rate"], r["front"])):
        def cell(k: str) -> str:
            lo, hi = r[f"{k}_spread"]
            return f"{r[k]:.1f} ({lo:.1f}-{hi:.1f})"
        lines.append(f"| {r['front']} | {r['rate']:g} | {cell('tokens_per_s')} | {cell('itl_p50_ms')} | "
                     f"{cell('itl_p99_ms')} | {cell('ttft_p50_ms')} | {r['failed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsjax.bench fronts", description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc", required=True, help="the server's gRPC address, HOST:PORT")
    p.add_argument("--http", required=True, help="the same server's OpenAI API, http://HOST:PORT")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, default="sharegpt")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--scale", type=float, default=8.0)
    p.add_argument("--rates", default="10,inf", help="comma-separated req/s; inf sends all at once")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows and ratios here")
    args = p.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    requests = load_bench_requests(args.workload, num_requests=args.num_requests, seed=args.seed, scale=args.scale)
    rows = compare_fronts({"grpc": args.grpc, "http": args.http}, requests, rates, args.rounds, args.seed)
    print(markdown(rows))
    rel = ratios(rows)
    for r in rel:
        print(f"rate {r['rate']:g}: HTTP/gRPC tokens/s {r['tokens_per_s_ratio']:.3f}, ITL p50 {r['itl_p50_ms_ratio']:.3f}, "
              f"ITL p99 {r['itl_p99_ms_ratio']:.3f}, TTFT p50 {r['ttft_p50_ms_ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratios": rel, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
