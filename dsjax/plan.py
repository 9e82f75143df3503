"""`python -m dsjax.plan`: simulate a placement, search for the best one, or generate a trace.

    python -m dsjax.plan simulate --profile P.json --model opt-13b --mode disaggregated \\
        --prefill tp=2,pp=1,n=1 --decode tp=1,pp=1,m=1 --workload TRACE.jsonl --rate 4 \\
        --ttft 0.2 --tpot 0.1 --json
    python -m dsjax.plan search --profile P.json --model opt-13b --nodes 1 --gpus-per-node 4 \\
        --workload sharegpt-like --ttft 0.2 --tpot 0.1 --out plan.json
    python -m dsjax.plan trace --lengths sharegpt-like --num-requests 2000 --rate 1 --out t.jsonl

--workload is a JSON Lines trace file or a length spec (sharegpt-like, fixed:P:O,
uniform:Pmin:Pmax:Omin:Omax, lognormal:Pmed:Psig:Omed:Osig) for a seeded Poisson trace.
KV capacities come from --max-num-tokens (default: max_num_tokens.csv next to the profile, if any;
"none" estimates them from model and device memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dsjax.placement import Placement, PhaseParallel, save_plan
from dsjax.planner.algorithms import ClusterSpec, algorithm1, algorithm2, best_colocated, ratio
from dsjax.planner.latency import Profile, load_profile
from dsjax.planner.metrics import SLO
from dsjax.planner.models import MemoryModel, get_device, get_model, read_max_num_tokens
from dsjax.planner.search import GoodputConfig, SearchContext
from dsjax.planner.simulator import SchedulerConfig, Simulator
from dsjax.planner.trace import (
    ARRIVALS,
    Trace,
    generate_trace,
    length_sampler_from_spec,
    read_trace,
    rescale_rate,
    resample,
    write_trace,
)


def _phase(spec: str, count_key: str) -> PhaseParallel:
    """'tp=2,pp=1,n=1' -> PhaseParallel(tp=2, pp=1, replicas=1)."""
    fields: dict[str, int] = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("tp", "pp", count_key, "replicas") or not value.strip().isdigit():
            raise ValueError(f"bad phase spec {spec!r}: expected tp=INT,pp=INT,{count_key}=INT")
        fields["replicas" if key in (count_key, "replicas") else key] = int(value)
    return PhaseParallel(**fields)


def _load_workload(spec: str, *, num_requests: int, seed: int, arrival: str, cv: float) -> Trace:
    if Path(spec).is_file():
        return read_trace(spec)
    if spec.endswith(".jsonl"):
        raise ValueError(f"trace file {spec!r} does not exist")
    lengths = length_sampler_from_spec(spec)
    return generate_trace(num_requests=num_requests, rate=1.0, lengths=lengths, arrival=arrival, cv=cv, seed=seed)


def _memory(args: argparse.Namespace, model_name: str) -> MemoryModel:
    table = None
    source = args.max_num_tokens
    if source is None:
        sibling = Path(args.profile).with_name("max_num_tokens.csv")
        source = str(sibling) if sibling.is_file() else "none"
    if source != "none":
        table = read_max_num_tokens(source)
    return MemoryModel(model=get_model(model_name), device=get_device(args.device), table=table)


def _scheduler(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(
        prefill_token_budget=args.prefill_tokens,
        decode_max_batch_size=args.max_batch_size,
        chunk_tokens=args.chunk_tokens,
        link_bytes_per_s=None if args.link_gbps is None else args.link_gbps * 1e9 / 8,
        kv_capacity_limit=not args.no_kv_limit,
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="latency profile JSON (DistServe schema)")
    p.add_argument("--model", required=True, help="model preset, e.g. opt-13b (or facebook/opt-13b)")
    p.add_argument("--workload", required=True, help="trace .jsonl or length spec (e.g. sharegpt-like)")
    p.add_argument("--ttft", type=float, required=True, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=float, required=True, help="TPOT SLO, seconds")
    p.add_argument("--max-num-tokens", default=None, help="KV capacity CSV, or 'none' to estimate")
    p.add_argument("--device", default="a100-80g", help="device for memory estimates (a100-80g, h100-80g, h200, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="arrivals of generated traces")
    p.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prefill batch token budget L_m (default: 90%% saturation)")
    p.add_argument("--max-batch-size", type=int, default=256, help="decode max batch size")
    p.add_argument("--chunk-tokens", type=int, default=512, help="chunked prefill: tokens per step")
    p.add_argument("--link-gbps", type=float, default=None, help="KV transfer bandwidth in Gbit/s (default: free)")
    p.add_argument("--no-kv-limit", action="store_true", help="ignore KV capacity (as DistServe's public simulator)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_simulate(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    model = get_model(args.model)
    if args.mode == "disaggregated":
        placement = Placement(prefill=_phase(args.prefill, "n"), decode=_phase(args.decode, "m"))
    else:
        placement = Placement.colocated(tp=args.tp, pp=args.pp, replicas=args.replicas, mode=args.mode)
    trace = _load_workload(args.workload, num_requests=args.num_requests, seed=args.seed, arrival=args.arrival, cv=args.cv)
    if args.rate is not None:
        trace = rescale_rate(trace, args.rate)
    sim = Simulator(placement=placement, profile=profile, model=model, memory=_memory(args, args.model), config=_scheduler(args))
    t0 = time.perf_counter()
    result = sim.run(trace, slo=SLO(ttft_s=args.ttft, tpot_s=args.tpot))
    out = result.summary() | {
        "rate": trace.mean_rate,
        "placement": placement.to_dict(),
        "num_devices": placement.num_devices,
        "sim_wall_s": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{placement.mode}: attainment {out['attainment']:.3f} (TTFT {out['ttft_attainment']:.3f}, "
            f"TPOT {out['tpot_attainment']:.3f}) at {out['rate']:.3g} req/s; TTFT p90 {out['ttft_p90_s']:.3f} s, "
            f"TPOT p90 {out['tpot_p90_s']:.4f} s"
        )
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    profile = load_profile(args.profile)
    model = get_model(args.model)
    gcfg = GoodputConfig(attainment_target=args.target, rel_tol=args.rel_tol, horizon_s=args.horizon)
    base = _load_workload(args.workload, num_requests=gcfg.max_requests, seed=args.seed, arrival=args.arrival, cv=args.cv)
    ctx = SearchContext(
        profile=profile,
        model=model,
        memory=_memory(args, args.model),
        slo=SLO(ttft_s=args.ttft, tpot_s=args.tpot),
        workload=resample(base, num_requests=gcfg.max_requests, seed=args.seed, arrival=args.arrival, cv=args.cv),
        scheduler=_scheduler(args),
        goodput_config=gcfg,
    )
    cluster = ClusterSpec(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    progress = not args.no_progress
    if args.affinity == "high":
        plan = algorithm1(ctx, cluster, rate=args.rate, unit=args.unit, progress=progress)
    else:
        plan = algorithm2(ctx, cluster, rate=args.rate, unit=args.unit, progress=progress)
    search_s = time.perf_counter() - t0
    baseline_profile: Profile = load_profile(args.baseline_profile) if args.baseline_profile else profile
    colo = best_colocated(ctx, cluster, mode=args.baseline, profile=baseline_profile, progress=progress)
    elapsed = time.perf_counter() - t0
    gain = ratio(plan.per_device_goodput, colo.per_device_goodput)
    meta: dict[str, Any] = {
        "goodput": plan.goodput,
        "per_device_goodput": plan.per_device_goodput,
        "num_devices": plan.placement.num_devices,
        "algorithm": plan.algorithm,
        "slo": {"ttft_s": args.ttft, "tpot_s": args.tpot, "attainment_target": args.target},
        "model": model.hf_name,
        "profile": str(args.profile),
        "workload": args.workload,
        "cluster": {"num_nodes": args.nodes, "gpus_per_node": args.gpus_per_node},
        "rate": args.rate,
        "colocated": {
            "placement": colo.placement.to_dict(), "goodput": colo.goodput,
            "per_device_goodput": colo.per_device_goodput, "profile": str(baseline_profile.source),
        },
        "ratio_vs_colocated": gain,
        "search_s": search_s,
        "total_s": elapsed,
        "num_simulations": ctx.num_simulations,
        "unit": plan.details.get("unit"),
        "copies": plan.details.get("copies"),
    }
    if "pair_per_device_goodput" in plan.details:
        meta["pair_per_device_goodput"] = plan.details["pair_per_device_goodput"]
    if args.out:
        save_plan(args.out, plan.placement, **meta)
    if args.json:
        print(json.dumps({"placement": plan.placement.to_dict()} | meta | {"details": plan.details}))
    else:
        print(
            f"best: {plan.describe()} | {plan.goodput:.3g} req/s on {plan.placement.num_devices} GPUs = "
            f"{plan.per_device_goodput:.3f} req/s/GPU | {args.baseline} best: {colo.describe()} = "
            f"{colo.per_device_goodput:.3f} req/s/GPU | ratio {gain:.2f}x | {elapsed:.1f} s"
            + (f" | plan written to {args.out}" if args.out else "")
        )
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    trace = generate_trace(
        num_requests=args.num_requests, rate=args.rate, lengths=length_sampler_from_spec(args.lengths),
        arrival=args.arrival, cv=args.cv, seed=args.seed,
    )
    write_trace(args.out, trace)
    print(json.dumps({"out": args.out} | trace.stats()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsjax.plan", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="simulate one placement on a trace")
    _add_common(sim)
    sim.add_argument("--mode", choices=("disaggregated", "colocated", "chunked"), default="disaggregated")
    sim.add_argument("--prefill", default="tp=1,pp=1,n=1", help="disaggregated: tp=,pp=,n= of prefill")
    sim.add_argument("--decode", default="tp=1,pp=1,m=1", help="disaggregated: tp=,pp=,m= of decode")
    sim.add_argument("--tp", type=int, default=1, help="colocated/chunked: tensor parallel degree")
    sim.add_argument("--pp", type=int, default=1, help="colocated/chunked: pipeline degree")
    sim.add_argument("--replicas", type=int, default=1, help="colocated/chunked: instances")
    sim.add_argument("--rate", type=float, default=None, help="rescale arrivals to this mean rate (req/s)")
    sim.add_argument("--num-requests", type=int, default=1000, help="requests of a generated workload")
    sim.set_defaults(fn=_cmd_simulate)

    se = sub.add_parser("search", help="search the best placement (Algorithm 1 or 2)")
    _add_common(se)
    se.add_argument("--nodes", type=int, required=True)
    se.add_argument("--gpus-per-node", type=int, required=True)
    se.add_argument("--affinity", choices=("high", "low"), default="high")
    se.add_argument("--unit", choices=("balanced", "pair"), default="balanced",
                    help="balanced n:m replication (default) or 1:1 prefill:decode pairs (public code)")
    se.add_argument("--rate", type=float, default=None, help="target traffic rate to size the plan for")
    se.add_argument("--target", type=float, default=0.9, help="attainment target")
    se.add_argument("--rel-tol", type=float, default=0.02, help="goodput bisection tolerance")
    se.add_argument("--horizon", type=float, default=60.0, help="seconds of traffic simulated per rate")
    se.add_argument("--baseline", choices=("colocated", "chunked"), default="colocated")
    se.add_argument("--baseline-profile", default=None, help="profile for the colocated baseline (default: --profile)")
    se.add_argument("--out", default=None, help="write the plan here (dsjax.placement.save_plan)")
    se.add_argument("--no-progress", action="store_true")
    se.set_defaults(fn=_cmd_search)

    tr = sub.add_parser("trace", help="generate a synthetic JSON Lines trace")
    tr.add_argument("--lengths", default="sharegpt-like")
    tr.add_argument("--num-requests", type=int, default=1000)
    tr.add_argument("--rate", type=float, default=1.0)
    tr.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    tr.add_argument("--cv", type=float, default=1.0)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True)
    tr.set_defaults(fn=_cmd_trace)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
