"""CLI: write a JSONL request trace from a real workload, and/or print its length statistics.

python -m dsjax.workloads --workload sharegpt --num 1000 --rate 2 --out trace.jsonl [--scale 4] [--stats]
python -m dsjax.workloads --workload longbench --stats            # stats of every prepared row
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dsjax.workloads.loader import WORKLOAD_NAMES, load_workload
from dsjax.workloads.stats import length_stats
from dsjax.workloads.trace_gen import ARRIVAL_PROCESSES, TraceConfig, make_trace, write_trace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsjax.workloads", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOAD_NAMES, required=True)
    parser.add_argument("--num", type=int, default=None, help="requests to sample (default: every prepared row)")
    parser.add_argument("--rate", type=float, default=None, help="mean arrival rate, requests/s (needed with --out)")
    parser.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default="poisson")
    parser.add_argument("--cv", type=float, default=1.0, help="gaps' coefficient of variation (gamma only)")
    parser.add_argument("--scale", type=float, default=1, help="divide both lengths by this (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source-limit", type=int, default=None, help="read only the first N source records")
    parser.add_argument("--out", default=None, help="JSONL trace to write")
    parser.add_argument("--stats", action="store_true", help="print mean/median/p90 of the lengths")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and not args.stats:
        parser.error("nothing to do: give --out and/or --stats")
    if args.out is not None and args.rate is None:
        parser.error("--out needs --rate")
    try:
        config = TraceConfig(rate=args.rate, arrival=args.arrival, cv=args.cv, seed=args.seed) if args.out else None
        lengths = load_workload(
            args.workload, num_requests=args.num, seed=args.seed, scale=args.scale, source_limit=args.source_limit
        )
    except ValueError as err:
        parser.error(str(err))
    if config is not None:
        trace = make_trace(lengths, config)
        write_trace(args.out, trace)
        span = trace[-1].arrival_s if trace else 0.0
        print(f"wrote {len(trace)} requests over {span:.1f} s to {args.out}", file=sys.stderr)
    if args.stats:
        print(length_stats(lengths).format(f"{args.workload} (seed {args.seed}, scale {args.scale:g})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
