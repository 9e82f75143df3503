"""Command line of `python -m dsjax.bench` (dsjax/bench/__main__.py is the entry point).

    python -m dsjax.bench --target localhost:50051 --workload sharegpt --rates 1,2,4 --ttft 0.3 --tpot 0.015 \\
        [--num-requests N] [--scale K] [--arrival poisson|gamma --cv C] [--seed S] [--out DIR]
    python -m dsjax.bench compare [--quick] [--workload sharegpt] [--model small-llama] [--out DIR]
    python -m dsjax.bench compare --emulate PROFILE --model opt-66b --workload humaneval --devices 32 [--quick]
    python -m dsjax.bench report DIR          # re-draw a compare directory's plots and summary.md
    python -m dsjax.bench fidelity DIR [DIR ...] [--out F.md] [--plot F.png]   # simulator vs repeated runs
    python -m dsjax.bench engine [ARGS]       # engine steps: prefill, decode, KV migration (engine_bench.py)
    python -m dsjax.bench kernels [ARGS]      # Pallas paged attention kernels vs XLA (kernel_bench.py)
    python -m dsjax.bench transfer [ARGS]     # KV transfer over gRPC vs raw TCP (transfer_bench.py)
    python -m dsjax.bench profile [ARGS]      # latency profile of the engine (= python -m dsjax.plan profile)
    python -m dsjax.bench fronts [ARGS]       # one server through gRPC and through the OpenAI HTTP API

The first form benchmarks a running server (several comma-separated targets are replicas: each
request goes to the one with the fewest in flight). The second starts the three systems in turn and
compares them (dsjax/bench/experiment.py). docs/results.md has the results and the commands. The
last four hand the rest of the command line to that module's `main` (`<command> --help` for its flags).

Every subcommand imports what it needs when it runs: importing this module pulls in neither jax
nor matplotlib nor grpc, and of the commands only the last four import jax.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Parse-time choices only (cheap: no jax, matplotlib or grpc); each subcommand imports the rest itself.
from dsjax.bench.prompts import PROMPT_FORMATS
from dsjax.runtime.host_devices import ensure_host_devices
from dsjax.workloads import WORKLOAD_NAMES
from dsjax.workloads.trace_gen import ARRIVAL_PROCESSES

# Micro-benchmarks: `python -m dsjax.bench NAME ARGS...` runs MODULE.main([*LEADING, *ARGS]).
# NAME: (MODULE, LEADING, host devices it wants, one line for --help). Imported only when run (they
# pull in jax); the engine benchmark's migration needs two devices (fake ones on a CPU).
FORWARDED: dict[str, tuple[str, tuple[str, ...], int, str]] = {
    "engine": ("dsjax.bench.engine_bench", (), 2, "engine steps: prefill tokens/s, decode step time, KV migration"),
    "kernels": ("dsjax.bench.kernel_bench", (), 1, "Pallas paged attention kernels against their XLA references"),
    "transfer": ("dsjax.bench.transfer_bench", (), 1, "KV transfer over gRPC on loopback against a raw TCP copy"),
    "profile": ("dsjax.plan", ("profile",), 1, "latency profile of the engine (same as `python -m dsjax.plan profile`)"),
    "fronts": ("dsjax.bench.fronts", (), 1, "one server through its gRPC and its OpenAI HTTP front, side by side"),
    "gpu": ("dsjax.bench.gpu_check", (), 1, "the GPU check (make gpu-check): kernel tests, kernels vs XLA, end-to-end tokens/s"),
}

SUBCOMMANDS: dict[str, str] = {
    "compare": "headline experiment: per-device goodput, disaggregated vs colocated vs chunked",
    "report": "re-draw a compare directory's plots and summary.md",
    "fidelity": "the planner's simulator against repeated compare runs",
    "regimes": "profiles side by side: prefill vs decode cost and how decode grows with the batch",
    "capacity": "router capacity on emulated devices: the rate its CPU sustains, added latency, CPU per process",
    "paper-table": "the paper-scale table: compare --emulate outputs beside the planner's predictions and the paper",
    "resimulate": "replay a compare --emulate run's rates through the current simulator (no servers)",
    **{name: line for name, (_, _, _, line) in FORWARDED.items()},
}

def _positive_floats(spec: str) -> tuple[float, ...]:
    if min(values := _floats(spec)) <= 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: every factor must be > 0")
    return values


def _floats(spec: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"{spec!r} must be a comma-separated list of numbers")
    return values


def _ints(spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} must be a comma-separated list of integers") from None


def _add_workload(p: argparse.ArgumentParser, *, num_requests: int | None) -> None:
    p.add_argument("--workload", choices=WORKLOAD_NAMES, default="sharegpt")
    p.add_argument("--num-requests", type=int, default=num_requests, help="requests per rate (one seeded sample)")
    p.add_argument("--scale", type=float, default=None,
                   help="divide prompt and output lengths (>= 1; default 1 for a server, 8 for compare)")
    p.add_argument("--seed", type=int, default=0, help="drives the sample, the prompts and the arrivals")
    p.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default="poisson")
    p.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation of the gaps")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="bytes",
                   help="bytes: real text as UTF-8 byte ids (dummy presets); gpt2: BPE ids; random: ids < --vocab-size; text")
    p.add_argument("--max-bisections", type=int, default=None, help="goodput bisection probes after the scan")
    p.add_argument("--rel-tol", type=float, default=None, help="bisection stops within this fraction of the failing rate")
    p.add_argument("--target-attainment", type=float, default=0.9)
    p.add_argument("--source-limit", type=int, default=None,
                   help="read only the first N records of the dataset (fast demos and tests)")
    p.add_argument("--no-progress", action="store_true")


def _subcommands_epilog() -> str:
    width = max(map(len, SUBCOMMANDS))
    return "other commands (python -m dsjax.bench COMMAND --help):\n" + "\n".join(
        f"  {name:<{width}}  {line}" for name, line in SUBCOMMANDS.items())


def build_run_parser() -> argparse.ArgumentParser:
    from dsjax.bench.loadgen import DEFAULT_REQUEST_TIMEOUT_S

    p = argparse.ArgumentParser(prog="python -m dsjax.bench", description="Benchmark a running dsjax server "
                                "(the other commands are listed at the end).",
                                epilog=_subcommands_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True,
                   help="HOST:PORT (gRPC), or http://HOST:PORT (any OpenAI-compatible server); several comma-separated "
                        "targets are replicas")
    p.add_argument("--rates", type=_floats, required=True, help="request rates to scan, req/s, increasing")
    p.add_argument("--ttft", type=float, required=True, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=float, required=True, help="TPOT SLO, seconds")
    _add_workload(p, num_requests=200)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="served vocabulary (checks ids; needed by --prompt-format random)")
    p.add_argument("--no-bisect", action="store_true", help="report the scan only (goodput = last passing scan rate)")
    p.add_argument("--warmup", type=int, default=0, help="requests sent at once before the scan, not measured")
    p.add_argument("--timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, help="per-request deadline, seconds")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the server to answer")
    p.add_argument("--label", default="server", help="system name in the results")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--no-plots", action="store_true")
    return p


def build_compare_parser() -> argparse.ArgumentParser:
    from dsjax.bench.servers import SYSTEMS

    p = argparse.ArgumentParser(prog="python -m dsjax.bench compare",
                                description="Per-device goodput of disaggregated vs colocated vs chunked prefill, "
                                            "each started in turn on the same cores, plus the simulator's prediction.")
    p.add_argument("--quick", action="store_true",
                   help="~13 minutes: 40 requests, 3 scan rates, 1 bisection (see docs/results.md)")
    p.add_argument("--model", default="opt-125m",
                   help="model preset served with dummy weights (default opt-125m: decode bound by memory bandwidth)")
    _add_workload(p, num_requests=None)
    p.add_argument("--rates", type=_floats, default=None, help="scan rates, req/s (default: around the simulated goodputs)")
    p.add_argument("--rate-factors", type=_positive_floats, default=None, metavar="F1,F2,...",
                   help="scan each system at these multiples of its own simulated goodput, instead of --rates (default "
                        "0.3,0.5,0.75,1,1.5, --quick 0.5,1,1.5; --emulate 0.6,0.8,0.9,1,1.1,1.25,1.5, --quick 0.7,0.9,1.15)")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: all; --emulate with --baseline-profile "
                        "adds 'vllm', colocated priced by that profile)")
    p.add_argument("--ttft", type=float, default=None, help="override the derived TTFT SLO, seconds")
    p.add_argument("--tpot", type=float, default=None, help="override the derived TPOT SLO, seconds")
    p.add_argument("--profile", type=Path, default=None, help="latency profile to use (default: cached, else measured)")
    p.add_argument("--reprofile", action="store_true", help="measure the profile again even if cached")
    p.add_argument("--full-profile", action="store_true", help="profile with the full grid instead of --quick")
    p.add_argument("--cores", type=_ints, default=(0, 1), help="the two cores (devices) the servers are pinned to")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers to cores")
    p.add_argument("--no-warmup-shapes", action="store_true",
                   help="servers compile shapes on first use instead of at start-up (dsjax/runtime/warmup.py)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for every server process")
    p.add_argument("--max-num-seqs", type=int, default=None, help="decode batch cap of every system (default 32; "
                   "--emulate: 256, vLLM's)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prefill batch budget L_m (and chunked step budget) of every system; default 256: on one CPU core "
                        "a packed prefill stops gaining from batching beyond ~256 tokens (docs/results.md); --emulate: 1024")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up requests per system (at once, then at the top and bottom scan rates); default 16 (--quick: 8)")
    p.add_argument("--speed-probe", type=float, default=None, metavar="S",
                   help="before each measured run, S seconds of unmeasured traffic at the same rate whose step costs "
                        "recalibrate the simulator (the fidelity table's 'probe' column); default 0: none")
    p.add_argument("--out", type=Path, default=Path("bench-results/compare"))
    p.add_argument("--docs-img", default=None, help="also copy the plots to docs/img/<PREFIX>-*.png")
    e = p.add_argument_group("emulated devices (the paper's experiments: dsjax/bench/emucompare.py)")
    e.add_argument("--emulate", type=Path, default=None, metavar="PROFILE",
                   help="serve on emulated devices priced by this latency profile (e.g. DistServe's A100 one), with "
                        "placements from the planner; --model is then opt-13b or opt-66b, lengths unscaled")
    e.add_argument("--devices", type=int, default=None, help="emulated devices in the cluster (with --emulate; default 8)")
    e.add_argument("--gpus-per-node", type=int, default=8)
    e.add_argument("--affinity", choices=("low", "high"), default="low",
                   help="disaggregated placement by Algorithm 2 (low node-affinity, the paper's testbed) or 1")
    e.add_argument("--emulate-link-gbps", type=float, default=None, help="KV transfer bandwidth (default: free)")
    e.add_argument("--baseline-profile", "--colocated-profile", dest="baseline_profile", type=Path, default=None,
                   help="adds the system 'vllm': colocated replicas priced by this profile (DistServe's vLLM one, the "
                        "paper's baseline); reported as disaggregated_over_vllm_ratio beside the same-profile ratios")
    e.add_argument("--run-seconds", type=float, default=None,
                   help="every run lasts this long at any rate (rate x this many requests, >= 100); default: from the "
                        "workload's request lifetime (dsjax/bench/emucompare.py)")
    e.add_argument("--settle-seconds", type=float, default=None,
                   help="the first seconds of every run load the server unmeasured; default: from the lifetime")
    e.add_argument("--steady-state", action="store_true",
                   help="runs of 12 mean request lifetimes (mean output x TPOT SLO; the first third unmeasured) at two "
                        "rates per system, 0.95x and 1.1x its simulated steady-state goodput: checks what a server "
                        "sustains, where short runs from an empty server flatter it (dsjax/bench/steadystate.py)")
    e.add_argument("--plan-only", action="store_true",
                   help="plan and simulate only: the placements, each system's simulated goodput on the runs' traces "
                        "and in steady state, and the scan rates, in summary.json; no server is started (for clusters "
                        "larger than this host can drive)")
    e.add_argument("--emulate-workers", choices=("inprocess", "processes"), default="inprocess",
                   help="every system's instances: threads of one server process (default), or worker processes "
                        "(prefill and decode workers; colocated and chunked replica workers)")
    e.add_argument("--stream-interval-ms", type=float, default=None,
                   help="servers hold a stream's later tokens this long (serve --stream-interval-ms; TTFT and TPOT "
                        "unchanged, several times fewer messages through the router and the client); default 1000, "
                        "0: every step's tokens at once")
    e.add_argument("--no-overlap-decode", dest="overlap_decode", action="store_false",
                   help="servers run decode steps one at a time (serve --no-overlap-decode): the host's work between "
                        "steps then holds the device, as before session 13")
    e.add_argument("--time-scale", type=float, default=1.0, metavar="K",
                   help="slow motion: the servers' emulated devices take K x their modelled time (serve "
                        "--emulate-time-scale), requests go out K x slower and every run is read back at 1/K, so rates "
                        "and latencies are the cluster's at full speed while the host's own time per emulated second "
                        "shrinks K x; runs take K x longer (for clusters whose token rate this host cannot keep up with)")
    return p


# The emulated compare's servers hold a stream's later tokens 1 s (the first token and the finish are
# never held, so TTFT and TPOT do not change): OPT-66B HumanEval on 24 emulated devices at 45 req/s,
# the client saw its first tokens p90 21.6 ms after the router with no interval, 6.0 ms with 200 ms;
# OPT-66B ShareGPT on 28 devices in worker processes at 18 req/s (~1,000 open streams) attained
# 64.9% with 200 ms, the client falling seconds behind the router, and 98.6% with 1 s
# (docs/results.md, "Session 10").
STREAM_INTERVAL_MS = 1000.0


def _main_emulated(args: argparse.Namespace, systems: tuple[str, ...]) -> dict:
    from dsjax.bench.emucompare import emulated_compare, run_emulated_compare
    from dsjax.bench.emulated_setup import EmulatedCluster

    cluster = EmulatedCluster(
        profile_path=args.emulate, model=args.model, devices=args.devices or 8, gpus_per_node=args.gpus_per_node,
        affinity=args.affinity, link_gbps=args.emulate_link_gbps, max_num_seqs=args.max_num_seqs or 256,
        max_prefill_tokens=args.max_prefill_tokens or 1024, baseline_profile=args.baseline_profile,
        workers=args.emulate_workers,
        stream_interval_ms=STREAM_INTERVAL_MS if args.stream_interval_ms is None else args.stream_interval_ms,
        overlap_decode=args.overlap_decode, time_scale=args.time_scale)
    ec = emulated_compare(
        quick=args.quick, cluster=cluster, out=args.out, workload=args.workload, seed=args.seed,
        prompt_format=args.prompt_format, systems=systems, rates=args.rates, rates_factors=args.rate_factors,
        arrival=args.arrival, cv=args.cv, target=args.target_attainment, ttft_s=args.ttft, tpot_s=args.tpot,
        num_requests=args.num_requests, scale=args.scale, max_bisections=args.max_bisections, rel_tol=args.rel_tol,
        warmup_requests=args.warmup, source_limit=args.source_limit, progress=not args.no_progress,
        run_seconds=args.run_seconds, settle_s=args.settle_seconds, steady=args.steady_state, plan_only=args.plan_only)
    return run_emulated_compare(ec)


def main_run(argv: list[str]) -> int:
    from dsjax.bench.analysis import SLOs, mean_breakdown, slo_scale_curve, write_json
    from dsjax.bench.metrics import write_results_csv, write_results_json
    from dsjax.bench.prompts import load_bench_requests
    from dsjax.bench.sweep import SweepConfig, sweep_target

    args = build_run_parser().parse_args(argv)
    slos = SLOs(ttft_s=args.ttft, tpot_s=args.tpot, target=args.target_attainment)
    requests = load_bench_requests(args.workload, num_requests=args.num_requests, seed=args.seed, scale=args.scale or 1,
                                   prompt_format=args.prompt_format, vocab_size=args.vocab_size,
                                   source_limit=args.source_limit)
    cfg = SweepConfig(rates=args.rates, arrival=args.arrival, cv=args.cv, seed=args.seed, bisect=not args.no_bisect,
                      rel_tol=args.rel_tol or 0.05, max_bisections=4 if args.max_bisections is None else args.max_bisections,
                      timeout_s=args.timeout, connect_timeout_s=args.connect_timeout, warmup_requests=args.warmup)
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sweep = sweep_target(targets if len(targets) > 1 else targets[0], requests, cfg, slos, label=args.label,
                         out_dir=out, progress=not args.no_progress)
    write_results_json(out / "results.json", list(sweep.rows))
    write_results_csv(out / "results.csv", list(sweep.rows))
    summary = {
        "target": args.target, "workload": args.workload, "scale": args.scale or 1, "num_requests": len(requests),
        "slo": {"ttft_s": slos.ttft_s, "tpot_s": slos.tpot_s, "target": slos.target},
        "goodput": sweep.goodput, "saturated": sweep.saturated, "probes": sweep.probes,
        "tightest_slo_scale": {row["rate"]: row["tightest_slo_scale"] for row in sweep.full_rows()},
    }
    write_json(out / "summary.json", summary)
    if not args.no_plots:
        from dsjax.bench.plots import plot_attainment_vs_rate, plot_attainment_vs_slo_scale, plot_latency_breakdown

        full = sweep.full_rows()
        plot_attainment_vs_rate({args.label: full}, out / "attainment_vs_rate.png", target=slos.target,
                                goodputs={args.label: sweep.goodput})
        plot_attainment_vs_slo_scale({f"{row['rate']:g} req/s": slo_scale_curve(sweep.run_at(row["rate"]).records, slos)
                                      for row in full}, out / "attainment_vs_slo_scale.png", target=slos.target)
        plot_latency_breakdown({f"{row['rate']:g} req/s": mean_breakdown(sweep.run_at(row["rate"])) for row in full},
                               out / "latency_breakdown.png")
    print(f"goodput {sweep.goodput:.4g} req/s{' (every scanned rate passed)' if sweep.saturated else ''} at "
          f"{slos.target:.0%} joint attainment (TTFT {slos.ttft_s:g} s, TPOT {slos.tpot_s:g} s); results in {out}")
    return 0


def main_compare(argv: list[str]) -> int:
    from dsjax.bench.emulated_setup import BASELINE_SYSTEM
    from dsjax.bench.experiment import CompareConfig, quick_config, run_compare
    from dsjax.bench.servers import SYSTEMS, ServerOptions

    args = build_compare_parser().parse_args(argv)
    if args.rates is not None and args.rate_factors is not None:
        raise ValueError("give --rates (one list for every system) or --rate-factors (around each system's "
                         "simulated goodput), not both")
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip()) if args.systems else SYSTEMS
    if args.emulate is not None:
        if args.systems is None:  # --quick / --steady-state: three systems, the paper's baseline, else chunked
            short = args.quick or args.steady_state
            systems = ("disaggregated", "colocated") if short else SYSTEMS
            systems += (BASELINE_SYSTEM,) if args.baseline_profile is not None else ("chunked",) if short else ()
        return _print_compare(_main_emulated(args, systems), args.model, args.out, args.docs_img)
    if args.devices is not None:
        raise ValueError("--devices needs --emulate (the CPU compare runs on two cores)")
    server = ServerOptions(model=args.model, max_num_seqs=args.max_num_seqs or 32,
                           max_prefill_tokens=args.max_prefill_tokens or 256, xla_flags=args.xla_flags,
                           pin=not args.no_pin, cores=args.cores, warmup_shapes=not args.no_warmup_shapes)
    overrides = {k: v for k, v in dict(
        out=args.out, model=args.model, workload=args.workload, seed=args.seed, prompt_format=args.prompt_format,
        systems=systems, rates=args.rates, rates_factors=args.rate_factors, arrival=args.arrival, cv=args.cv,
        target=args.target_attainment, ttft_s=args.ttft, tpot_s=args.tpot, profile=args.profile, reprofile=args.reprofile,
        quick_profile=not args.full_profile, server=server, progress=not args.no_progress,
        num_requests=args.num_requests, scale=args.scale, max_bisections=args.max_bisections, rel_tol=args.rel_tol,
        warmup_requests=args.warmup, source_limit=args.source_limit, speed_probe_s=args.speed_probe,
    ).items() if v is not None}
    cfg = quick_config(**overrides) if args.quick else CompareConfig(**overrides)
    return _print_compare(run_compare(cfg), cfg.model, cfg.out, args.docs_img)


def _print_compare(summary: dict, model: str, out: Path, docs_img: str | None) -> int:
    from dsjax.bench.report import copy_plots

    if summary.get("plan_only"):  # nothing was measured: the placements and the simulator's goodputs
        systems = summary["systems"]
        print("planned only (no server started): " + "; ".join(
            f"{s} {d['placement_text']}, simulated {d['simulated_goodput']:.3g} req/s on the runs' traces"
            for s, d in systems.items()) + f"; results in {out}")
        print(json.dumps({"plan_only": True, "model": model, "devices": summary["devices"],
                          "steady_state": summary["steady_state"], "wall_s": summary["wall_s"]}, indent=1, default=str))
        return 0
    if docs_img:
        copied = copy_plots(out, Path(__file__).resolve().parents[2] / "docs" / "img", docs_img)
        print("plots copied to " + ", ".join(str(p) for p in copied))
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in summary["ratios"].items())
    print(f"per-device goodput: " + ", ".join(f"{s} {d['per_device_goodput']:.3g}" for s, d in summary["systems"].items())
          + (f"; {ratios}" if ratios else "") + f"; results in {out}")
    headline = {k: summary[k] for k in ("per_device_goodput", "regime", "slo", "max_attainment_gap_points",
                                        "max_engine_side_gap_points", "devices") if k in summary}
    headline.update({k: v for k, v in summary.items() if k.endswith("_ratio")})
    headline["model"], headline["wall_s"] = model, summary.get("wall_s")
    print(json.dumps(headline, indent=1, default=str))
    return 0


def main_report(argv: list[str]) -> int:
    from dsjax.bench.report import copy_plots, rerender

    p = argparse.ArgumentParser(prog="python -m dsjax.bench report",
                                description="Re-draw the plots and summary.md of a `compare` output directory.")
    p.add_argument("out", type=Path)
    p.add_argument("--docs-img", default=None, help="also copy the plots to docs/img/<PREFIX>-*.png")
    args = p.parse_args(argv)
    summary = rerender(args.out)
    if args.docs_img:
        copy_plots(args.out, Path(__file__).resolve().parents[2] / "docs" / "img", args.docs_img)
    print((args.out / "summary.md").read_text(), end="")
    return 0 if summary else 1


def main_fidelity(argv: list[str]) -> int:
    from tqdm import tqdm

    from dsjax.bench.fidelity import aggregate, markdown, plot, simulate_runs

    p = argparse.ArgumentParser(prog="python -m dsjax.bench fidelity",
                                description="The planner's simulator against repeated `compare` runs of the same "
                                            "trace and rates (dsjax/bench/fidelity.py).")
    p.add_argument("runs", type=Path, nargs="+", help="compare output directories (with their logs/)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--plot", type=Path, default=None, help="also draw measured vs simulated attainment (PNG)")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "summary.json").is_file()]
    if missing:
        print(f"error: no summary.json in {missing}", file=sys.stderr)
        return 2
    per_run = [simulate_runs(r) for r in tqdm(args.runs, desc="re-simulating runs", unit="run")]
    points = aggregate(per_run)
    if not points:
        print("error: no (system, rate) was measured in full by every run", file=sys.stderr)
        return 2
    text = markdown(points)
    if args.out:
        args.out.write_text(text)
    if args.plot:
        plot(points, args.plot, title=f"{len(args.runs)} runs")
    print(text, end="")
    return 0


def main_regimes(argv: list[str]) -> int:
    from dsjax.bench.regime import plot_regimes, regime_markdown, regime_row
    from dsjax.planner.latency import load_profile

    p = argparse.ArgumentParser(prog="python -m dsjax.bench regimes",
                                description="Latency profiles side by side (dsjax/bench/regime.py): the 512-token "
                                            "prefill in decode steps, and the decode step against the batch.")
    p.add_argument("profiles", nargs="+", metavar="LABEL=PATH[:MODEL]",
                   help="a profile JSON (`python -m dsjax.plan profile`, or DistServe's), MODEL if it holds several")
    p.add_argument("--plot", type=Path, default=None, help="also draw step time / batch-1 step against the batch (PNG)")
    args = p.parse_args(argv)
    rows = []
    for spec in args.profiles:
        label, _, rest = spec.rpartition("=")
        path, _, model = rest.partition(":")
        profile = load_profile(Path(path))
        models = list(profile.entries)
        if not model and len(models) != 1:
            raise ValueError(f"{path} holds {models}: name one as {path}:MODEL")
        rows.append(regime_row(label or Path(path).stem, profile, model or models[0]))
    print(regime_markdown(rows), end="")
    if args.plot:
        print(f"plot: {plot_regimes(rows, args.plot)}")
    return 0


def main_forwarded(name: str, argv: list[str]) -> int:
    """Run micro-benchmark `name` (a key of FORWARDED) on `argv`; its exit code (None: 0)."""
    module_name, leading, host_devices, _ = FORWARDED[name]
    ensure_host_devices(host_devices)
    module = importlib.import_module(module_name)
    rc = module.main([*leading, *argv])
    return 0 if rc is None else rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in FORWARDED:  # their own error handling, as when run on their own
        return main_forwarded(argv[0], argv[1:])
    try:
        if argv[:1] == ["compare"]:
            return main_compare(argv[1:])
        if argv[:1] == ["report"]:
            return main_report(argv[1:])
        if argv[:1] == ["fidelity"]:
            return main_fidelity(argv[1:])
        if argv[:1] == ["regimes"]:
            return main_regimes(argv[1:])
        if argv[:1] == ["capacity"]:  # dsjax/bench/capacity.py parses its own flags
            return importlib.import_module("dsjax.bench.capacity").main(argv[1:])
        if argv[:1] == ["paper-table"]:
            return importlib.import_module("dsjax.bench.papertable").main(argv[1:])
        if argv[:1] == ["resimulate"]:
            return importlib.import_module("dsjax.bench.resimulate").main(argv[1:])
        return main_run(argv)
    except (ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
