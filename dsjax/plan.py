"""`python -m dsjax.plan`: profile the engine, simulate a placement, search for the best one, or
generate a trace.

    python -m dsjax.plan profile --model small-llama --tp 1,2 --out profile.json [--quick]
    python -m dsjax.plan simulate --profile P.json --model opt-13b --mode disaggregated \\
        --prefill tp=2,pp=1,n=1 --decode tp=1,pp=1,m=1 --workload TRACE.jsonl --rate 4 \\
        --ttft 0.2 --tpot 0.1 --json [--semantics distserve] [--goodput]
    python -m dsjax.plan search --profile P.json --model opt-13b --nodes 1 --gpus-per-node 4 \\
        --workload sharegpt --ttft 0.2 --tpot 0.1 --out plan.json
    python -m dsjax.plan trace --lengths sharegpt --num-requests 2000 --rate 1 --out t.jsonl
    python -m dsjax.plan fit-served --profile P.json --model small-llama --out served.json steps/*.jsonl

--workload is a JSON Lines trace file, a real dataset (sharegpt, humaneval, longbench: lengths from
dsjax.workloads in OPT tokens, i.e. GPT-2 BPE + 1 for OPT's BOS, pairs of 2048 tokens or more
dropped as DistServe does) or a length spec (sharegpt-like, fixed:P:O, uniform:Pmin:Pmax:Omin:Omax,
lognormal:Pmed:Psig:Omed:Osig) for a seeded Poisson trace.
KV capacities come from --max-num-tokens (default: max_num_tokens.csv next to the profile, if any;
"none" estimates them from model and device memory).

`profile` is the only command that imports jax (dsjax/bench/profiler.py). With tp * pp > 1 on a
CPU it needs fake devices; unless XLA_FLAGS already sets --xla_force_host_platform_device_count it
sets it to tp * pp before importing jax.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dsjax.engine.placement import PhaseParallel, Placement, save_plan
from dsjax.planner.algorithms import ClusterSpec, algorithm1, algorithm2, best_colocated, ratio
from dsjax.planner.architecture import fleet_placement, search_architectures
from dsjax.planner.distserve_sim import CRITERIA, SEMANTICS, DistServeSimulator, placement_goodput, search_context, search_pairs
from dsjax.planner.latency import Profile, load_profile, save_profile
from dsjax.planner.model_spec import MemoryModel, get_device, get_model, read_max_num_tokens
from dsjax.planner.search import GoodputConfig
from dsjax.planner.simulator import SimConfig, Simulator
from dsjax.planner.slo import SLO
from dsjax.runtime.host_devices import ensure_host_devices
from dsjax.workloads.loader import WORKLOAD_NAMES, load_workload
from dsjax.workloads.trace_gen import (
    ARRIVALS,
    Trace,
    TraceConfig,
    generate_trace,
    length_sampler_from_spec,
    make_trace,
    read_trace,
    resample,
    rescale_rate,
    write_trace,
)

GIB = 1 << 30
OPT_BOS_TOKENS = 1  # OPT's tokenizer prepends </s>; dsjax.workloads counts GPT-2 BPE tokens without it
DATASET_MAX_TOTAL = 2048  # DistServe drops pairs with prompt + output >= 2048 OPT tokens


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


def dataset_trace(name: str, *, num_requests: int, seed: int = 0, arrival: str = "poisson", cv: float = 1.0) -> Trace:
    """A unit-rate trace of a real workload's lengths in OPT tokens.

    `load_workload(name, num_requests=..., seed=...)` counts GPT-2 BPE tokens; OPT's tokenizer adds
    a BOS token to every `encode`, so DistServe's prompt and output lengths are ours + 1. Pairs whose
    OPT lengths sum to 2048 or more are then dropped (DistServe's rule), so a few fewer than
    `num_requests` may remain.
    """
    pairs = [
        (p + OPT_BOS_TOKENS, o + OPT_BOS_TOKENS)
        for p, o in load_workload(name, num_requests=num_requests, seed=seed)
        if p + o + 2 * OPT_BOS_TOKENS < DATASET_MAX_TOTAL
    ]
    if not pairs:
        raise ValueError(f"workload {name!r} gave no requests under {DATASET_MAX_TOTAL} tokens")
    return make_trace(pairs, TraceConfig(rate=1.0, arrival=arrival, cv=cv if arrival == "gamma" else 1.0, seed=seed))


def _load_workload(spec: str, *, num_requests: int, seed: int, arrival: str, cv: float) -> Trace:
    if spec in WORKLOAD_NAMES:
        return dataset_trace(spec, num_requests=num_requests, seed=seed, arrival=arrival, cv=cv)
    if Path(spec).is_file():
        trace = read_trace(spec)
        if not len(trace):
            raise ValueError(f"trace file {spec!r} has no requests")
        return trace
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


def _scheduler(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        prefill_token_budget=args.prefill_tokens,
        decode_max_batch_size=args.max_batch_size,
        chunk_tokens=args.chunk_tokens,
        link_bytes_per_s=None if args.link_gbps is None else args.link_gbps * 1e9 / 8,
        transfer_fixed_s=args.transfer_fixed_ms * 1e-3,
        decode_join_s=args.decode_join_ms * 1e-3,
        kv_capacity_limit=not args.no_kv_limit,
        shape_buckets=not args.no_buckets,
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="latency profile JSON (DistServe schema)")
    p.add_argument("--model", required=True, help="model preset, e.g. opt-13b (or facebook/opt-13b)")
    p.add_argument("--workload", required=True,
                   help=f"trace .jsonl, a dataset ({', '.join(WORKLOAD_NAMES)}) or a length spec (e.g. sharegpt-like)")
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
    p.add_argument("--transfer-fixed-ms", type=float, default=0.0, help="fixed time of one KV transfer, ms")
    p.add_argument("--decode-join-ms", type=float, default=0.0,
                   help="decode-instance time to land one joining request's KV, ms (fit-served --split-joins reports it)")
    p.add_argument("--no-kv-limit", action="store_true", help="ignore KV capacity (as DistServe's public simulator)")
    p.add_argument("--no-buckets", action="store_true",
                   help="ignore the profile's shape buckets (cost batches unpadded, as DistServe's profiles)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--semantics", choices=SEMANTICS, default="dsjax",
                   help="distserve: DistServe's public simulator (planner/distserve_sim.py); the scheduler knobs above do not apply")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="goodput rule: joint (attainment, default with dsjax) or p90 (P90 TTFT and TPOT apart, default with distserve)")


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
    memory = _memory(args, args.model)
    if args.goodput:  # the trace's own requests and arrival shape, rescaled per rate
        gcfg = GoodputConfig(attainment_target=args.target, rel_tol=args.rel_tol, min_requests=len(trace), max_requests=len(trace))
        ctx = search_context(semantics=args.semantics, criterion=args.criterion, profile=profile, model=model, memory=memory,
                             slo=SLO(ttft_s=args.ttft, tpot_s=args.tpot), workload=resample(trace, num_requests=len(trace)),
                             scheduler=_scheduler(args), goodput_config=gcfg)
        out = placement_goodput(ctx, placement) | {"placement": placement.to_dict(), "num_requests": len(trace)}
        print(json.dumps(out) if args.json else f"{placement.mode}: {out['per_device_goodput']:.3f} req/s/GPU ({out['goodput']:.3g} req/s; "
              f"DistServe's 0.25 grid: {out['per_device_goodput_grid']:.4g}), {args.semantics} semantics, {out['criterion']} rule")
        return 0
    if args.semantics == "distserve":
        sim = DistServeSimulator(placement=placement, profile=profile, model=model, memory=memory)
    else:
        sim = Simulator(placement=placement, profile=profile, model=model, memory=memory, config=_scheduler(args))
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
    lifetimes = args.lifetimes if args.lifetimes is not None else 0.0 if args.semantics == "distserve" else GoodputConfig.lifetimes
    gcfg = GoodputConfig(attainment_target=args.target, rel_tol=args.rel_tol, horizon_s=args.horizon, lifetimes=lifetimes)
    base = _load_workload(args.workload, num_requests=gcfg.max_requests, seed=args.seed, arrival=args.arrival, cv=args.cv)
    ctx = search_context(
        semantics=args.semantics, criterion=args.criterion,
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
    if args.semantics == "distserve":  # the public code's search: every 1:1 pair simulated whole
        plan = search_pairs(ctx, cluster, affinity=args.affinity, progress=progress)
    elif args.affinity == "high":
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
        "semantics": args.semantics, "criterion": getattr(ctx, "criterion", "joint"),
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
        "horizon_s": ctx.horizon_s, "search_s": search_s, "total_s": elapsed,
        "num_simulations": ctx.num_simulations,
        "unit": plan.details.get("unit"), "copies": plan.details.get("copies"),
    }
    if "pair_per_device_goodput" in plan.details:
        meta["pair_per_device_goodput"] = plan.details["pair_per_device_goodput"]
    chosen = plan.placement
    if args.semantics != "distserve":  # the best architecture for this engine: same profile for all
        arch = search_architectures(ctx, cluster, plan, rate=args.rate, progress=progress)
        meta["architecture"], chosen = arch.to_dict(), fleet_placement(arch.chosen, plan)
        print(arch.describe(), file=sys.stderr)
    if args.out:
        save_plan(args.out, chosen, **meta)
    if args.json:
        print(json.dumps({"placement": plan.placement.to_dict(), "chosen_placement": chosen.to_dict()} | meta
                         | {"details": plan.details}))
    else:
        print(
            f"best: {plan.describe()} | {plan.goodput:.3g} req/s on {plan.placement.num_devices} GPUs = "
            f"{plan.per_device_goodput:.3f} req/s/GPU | {args.baseline} best: {colo.describe()} = "
            f"{colo.per_device_goodput:.3f} req/s/GPU | ratio {gain:.2f}x | {elapsed:.1f} s"
            + (f" | {chosen.mode} plan written to {args.out}" if args.out else "")
        )
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    if args.lengths in WORKLOAD_NAMES:
        trace = rescale_rate(
            dataset_trace(args.lengths, num_requests=args.num_requests, seed=args.seed, arrival=args.arrival, cv=args.cv),
            args.rate,
        )
    else:
        trace = generate_trace(
            num_requests=args.num_requests, rate=args.rate, lengths=length_sampler_from_spec(args.lengths),
            arrival=args.arrival, cv=args.cv, seed=args.seed,
        )
    write_trace(args.out, trace)
    print(json.dumps({"out": args.out} | trace.stats()))
    return 0


def _int_list(spec: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{name}={spec!r} must be a comma-separated list of integers >= 1")
    return values


def _cmd_profile(args: argparse.Namespace) -> int:
    tps = _int_list(args.tp, "--tp")
    if args.pp < 1:
        raise ValueError(f"--pp={args.pp} must be >= 1")
    ensure_host_devices(max(tps) * args.pp)
    from dsjax.bench import profiler  # imports jax: only this command pays for it

    profile = profiler.profile_engine(
        args.model, tps=tps, pp=args.pp, dtype=args.dtype, block_size=args.block_size, quick=args.quick,
        max_len=args.max_len, reps=args.reps, attention=args.attention, kv_budget_bytes=int(args.kv_budget_gib * GIB), seed=args.seed,
        progress=not args.no_progress,
    )
    save_profile(args.out, profile)
    meta = profile.metadata
    for key, by_tp in profile.entries.items():
        for tp, c in sorted(by_tp.items()):
            fit = meta["fit"][str(tp)]
            print(
                f"{key} tp={tp}: prefill {[f'{x:.4g}' for x in c.prefill]}, decode {[f'{x:.4g}' for x in c.decode_small]}"
                f" | fit error mean {fit['mean_rel_err']:.1%}, max {fit['max_rel_err']:.1%}"
            )
    print(
        f"prefill_512_ms {meta['prefill_512_ms']:.2f}, decode_bs1_ctx512_ms {meta['decode_bs1_ctx512_ms']:.2f} "
        f"(tp={meta['isolated_tp']}) | {meta['device']} ({meta['platform']}), {meta['wall_s']:.0f} s | written to {args.out}"
    )
    return 0


def _cmd_fit_served(args: argparse.Namespace) -> int:
    from dsjax.planner.served import TABLE_MIN_RECORDS, fit_served, served_profile
    from serving.step_log import read_step_log

    base = load_profile(args.profile)
    records = [rec for path in args.logs for rec in read_step_log(path, since=args.since, until=args.until)]
    fit = fit_served(records, buckets=base.buckets, min_group=args.min_group, base=base.coeffs(args.model, args.tp),
                     split_joins=args.split_joins)
    profile = served_profile(base, args.model, args.tp, fit, logs=args.logs)
    save_profile(args.out, profile)
    old, new = base.coeffs(args.model, args.tp), fit.coeffs
    print(f"{len(records)} served steps: {len(fit.samples.prefill)} prefill, {len(fit.samples.decode)} decode, "
          f"{fit.samples.mixed} mixed and {fit.samples.multi} multi-call (not fitted)")
    print(f"prefill {[f'{x:.4g}' for x in new.prefill]} (runner profile {[f'{x:.4g}' for x in old.prefill]}), "
          f"{fit.prefill_groups} shapes, median error {fit.prefill_median_rel_err:.1%}")
    print(f"decode  {[f'{x:.4g}' for x in new.decode_small]} (runner profile {[f'{x:.4g}' for x in old.decode_small]}), "
          f"{fit.decode_groups} shapes, median error {fit.decode_median_rel_err:.1%}")
    c = fit.coeffs
    print(f"measured shape tables: {len(c.prefill_table)} prefill, {len(c.decode_table)} decode shapes "
          f"(served >= {TABLE_MIN_RECORDS} times; they cost their own mean time)")
    if args.split_joins:
        print(f"KV landing: {fit.decode_join_ms:.2f} ms per joining request over {len(fit.samples.decode_joined)} steps "
              f"(simulate ... --decode-join-ms {fit.decode_join_ms:.2f})")
    if fit.scaled:
        print(f"too few shapes for {' and '.join(fit.scaled)}: the runner profile's form scaled by served / runner")
    print(f"written to {args.out}")
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
    sim.add_argument("--goodput", action="store_true", help="print the highest rate meeting --target instead (--rate ignored)")
    sim.add_argument("--target", type=float, default=0.9, help="--goodput: attainment target")
    sim.add_argument("--rel-tol", type=float, default=0.02, help="--goodput: bisection tolerance")
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
    se.add_argument("--horizon", type=float, default=60.0, help="seconds of traffic simulated per rate, at least")
    se.add_argument("--lifetimes", type=float, default=None, help=f"and at least this many mean request lifetimes "
                    f"(mean output x TPOT SLO; default {GoodputConfig.lifetimes:g}, steady state; 0 with --semantics distserve)")
    se.add_argument("--baseline", choices=("colocated", "chunked"), default="colocated")
    se.add_argument("--baseline-profile", default=None, help="profile for the colocated baseline (default: --profile)")
    se.add_argument("--out", default=None, help="write the plan here (dsjax.engine.placement.save_plan)")
    se.add_argument("--no-progress", action="store_true")
    se.set_defaults(fn=_cmd_search)

    pr = sub.add_parser("profile", help="time the engine's prefill and decode programs and fit a latency profile")
    pr.add_argument("--model", required=True, help="model preset (e.g. small-llama) or HF checkpoint dir; random weights")
    pr.add_argument("--tp", default="1", help="comma-separated TP degrees, e.g. 1,2")
    pr.add_argument("--pp", type=int, default=1, help="pipeline degree of the profiled instances")
    pr.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    pr.add_argument("--block-size", type=int, default=16, help="KV block size (tokens)")
    pr.add_argument("--quick", action="store_true", help="a ~16-shape grid (~1-2 min for small-llama on 2 CPU cores)")
    pr.add_argument("--max-len", type=int, default=None, help="cap prompt and context lengths of the grid")
    pr.add_argument("--reps", type=int, default=None, help="timed runs per shape (default: 3 quick, 5 full)")
    pr.add_argument("--attention", choices=("auto", "padded", "dense", "ragged"), default="auto",
                    help="shape-bucket features (planner.buckets.ShapeBuckets); auto: padded for XLA attention, ragged for Pallas")
    pr.add_argument("--kv-budget-gib", type=float, default=1.0, help="KV pool size cap; full-grid decode points must fit")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", required=True, help="profile JSON to write (DistServe schema + metadata)")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(fn=_cmd_profile)

    fs = sub.add_parser("fit-served", help="fit a profile on served step logs (python -m dsjax.serve --step-log DIR)")
    fs.add_argument("logs", nargs="+", help="step log files (DIR/<worker>.jsonl)")
    fs.add_argument("--profile", required=True, help="the engine profile whose shape buckets and other entries to keep")
    fs.add_argument("--model", required=True, help="the model entry to replace (e.g. small-llama)")
    fs.add_argument("--tp", type=int, default=1)
    fs.add_argument("--since", type=float, default=None, help="only steps started at or after this time.time()")
    fs.add_argument("--until", type=float, default=None, help="only steps started before this time.time()")
    fs.add_argument("--min-group", type=int, default=3, help="records a padded shape needs to count")
    fs.add_argument("--split-joins", action="store_true",
                    help="decode-worker logs: fit the KV landing between steps apart from the step (disaggregated)")
    fs.add_argument("--out", required=True)
    fs.set_defaults(fn=_cmd_fit_served)

    tr = sub.add_parser("trace", help="generate a JSON Lines trace (synthetic or real dataset lengths)")
    tr.add_argument("--lengths", default="sharegpt-like", help=f"length spec or dataset ({', '.join(WORKLOAD_NAMES)})")
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
