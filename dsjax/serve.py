"""`python -m dsjax.serve`: the gRPC server (router, prefill and decode workers).

With no arguments: tiny-chat (a small LLaMA trained on ShareGPT that ships in the package,
models/checkpoints), disaggregated in this process on two local
devices (prefill on device 0, decode on device 1; on a CPU host the two devices are made with
XLA_FLAGS), gRPC on :50051 (health, reflection), the OpenAI HTTP API on :8000, Prometheus metrics
on :9090, all on loopback (`--host 0.0.0.0` exposes them). With one device (one GPU, or
XLA_FLAGS=--xla_force_host_platform_device_count=1 on a CPU host) and no --mode or --plan, it
serves colocated instead. Attention runs the Pallas kernels on GPU and the XLA path elsewhere
(`--attention-backend auto`).

    python -m dsjax.serve                                   # the demo above
    python -m dsjax.serve --workers processes --prefill-tp 2 --decode-replicas 2
    python -m dsjax.serve --plan plan.json --model /ckpt/opt-13b
    python -m dsjax.serve --mode chunked --prefill-tp 2     # a colocated baseline
    python -m dsjax.serve --mode colocated --workers processes --prefill-replicas 2   # replicas in processes
    python -m dsjax.serve --emulate A100_PROFILE.json --model opt-13b --prefill-tp 2   # emulated devices (dsjax/emulate.py)
    python -m dsjax.serve certs ./tls && python -m dsjax.serve --workers processes --tls-dir ./tls   # mutual TLS
    # one role per host, all with the same DSJAX_CLUSTER_TOKEN (serving/cluster_auth.py):
    export DSJAX_CLUSTER_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    python -m dsjax.serve --role router --host 0.0.0.0 --port 50051
    python -m dsjax.serve --role prefill --router ROUTER:50051 --host 0.0.0.0 --advertise-host THIS_HOST --prefill-tp 2
    python -m dsjax.serve --role decode  --router ROUTER:50051 --host 0.0.0.0 --advertise-host THIS_HOST
    # colocated replicas instead: the router with --mode colocated, then on each host
    python -m dsjax.serve --role replica --mode colocated --router ROUTER:50051 --host 0.0.0.0 --advertise-host THIS_HOST

docs/serving.md describes the processes, the wire format and the failure handling.
"""

from __future__ import annotations

import argparse
import os
import sys

from dsjax.engine.placement import MODES
from serving import gc_pauses
from models.checkpoints import DEFAULT_MODEL, resolve_model

# models.attention.BACKENDS; spelled out here because this module must not import jax (XLA_FLAGS first).
ATTENTION_BACKENDS = ("auto", "pallas", "xla")


def _share(text: str) -> tuple[int, int]:
    """--warmup-share "I/N" -> (I, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want I/N, e.g. 1/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: want 0 <= I < N")
    return i, n


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} must be >= 0")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsjax.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL,
                   help="a Hugging Face checkpoint directory, a packaged checkpoint (tiny-chat: trained, the default) "
                        "or a preset name (random weights)")
    m.add_argument("--dummy-weights", action="store_true", help="random weights (implied for presets)")
    m.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default float32; with --emulate the profile's (float16 for DistServe's)")
    m.add_argument("--seed", type=int, default=0, help="dummy-weight seed (identical weights in every process)")
    m.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="attention path of every instance: auto = the Pallas kernels on GPU, XLA elsewhere "
                        "(pallas on CPU runs the kernels interpreted: slow)")
    s = p.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface every listener binds (default loopback; 0.0.0.0 or [::] exposes them)")
    s.add_argument("--port", type=int, default=None, help="gRPC port (0: any free port); default 50051, workers 0")
    s.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API of the router (0: off; -1: any free port)")
    s.add_argument("--api-key", default=os.environ.get("DSJAX_API_KEY") or None,
                   help="require `Authorization: Bearer KEY` on the public HTTP and gRPC APIs (default $DSJAX_API_KEY)")
    s.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics and /debug/instances (-1: off)")
    s.add_argument("--tls-dir", default=os.environ.get("DSJAX_TLS_DIR") or None,
                   help="mutual TLS on every internal gRPC call and listener, with DIR/ca.pem, node.pem, node-key.pem "
                        "(`python -m dsjax.serve certs DIR` makes them; default $DSJAX_TLS_DIR); the router's Registry "
                        "and Admin then move to --cluster-port")
    s.add_argument("--cluster-port", type=int, default=None,
                   help="the router's listener for the cluster's services (Registry, Admin; workers' --router points "
                        "here); default: none, they share --port, or 50052 with --tls-dir or --api-tls-cert")
    s.add_argument("--api-tls-cert", default=None, help="serve the public gRPC port and the HTTP API over TLS with this PEM certificate")
    s.add_argument("--api-tls-key", default=None, help="the private key (PEM) of --api-tls-cert")
    s.add_argument("--mode", choices=MODES, default=None,
                   help="default: the plan's, else disaggregated, or colocated where the in-process server sees one device")
    s.add_argument("--plan", help="a placement written by the planner (dsjax.engine.placement.save_plan)")
    s.add_argument("--workers", choices=("inprocess", "processes"), default="inprocess")
    s.add_argument("--role", choices=("router", "prefill", "decode", "replica"), default=None,
                   help="run one role only (one per host); without it, everything")
    s.add_argument("--router", help="router address HOST:PORT (worker roles)")
    s.add_argument("--advertise-host", default="127.0.0.1", help="host others use to reach this worker")
    s.add_argument("--worker-id", help="stable worker name (worker roles); default ROLE-PID")
    s.add_argument("--max-pending", type=int, default=256, help="admission queue: requests in flight before RESOURCE_EXHAUSTED")
    s.add_argument("--max-request-bytes", type=int, default=1 << 20)
    s.add_argument("--stream-interval-ms", type=float, default=0.0,
                   help="hold a stream's later tokens up to this long after its previous message (in-process "
                        "backends, and decode workers' streams; vLLM's stream interval): fewer messages, the same TTFT and TPOT (the first token and "
                        "the finish are never held); 0: every step's tokens at once")
    s.add_argument("--max-tokens-limit", type=int, default=None, help="cap on max_tokens (default: the context length)")
    s.add_argument("--lease-seconds", type=float, default=30.0, help="KV held for transfer is freed if not pulled in time")
    s.add_argument("--kv-chunk-bytes", type=int, default=1 << 20, help="K+V bytes per KV chunk message")
    s.add_argument("--kv-staging-mib", type=int, default=512,
                   help="prefill workers gather held KV off the pool right after prefill, up to this many MiB, "
                        "so pulls need not wait for the engine thread (0: export at pull time)")
    s.add_argument("--max-recomputes", type=int, default=2,
                   help="times a request whose KV or worker is lost is prefilled again from its tokens so far")
    s.add_argument("--max-prefill-inflight", type=int, default=None,
                   help="Prefill calls one prefill worker holds at once; more wait in the router, first come first "
                        "served (default: serving.remote.MAX_PREFILL_INFLIGHT, 64)")
    s.add_argument("--max-lease-seconds", type=float, default=None,
                   help="renewals keep held KV at most this long (default 20 x --lease-seconds)")
    s.add_argument("--hung-worker-seconds", type=float, default=60.0,
                   help="the router quarantines a worker whose engine is stuck in one step this long while it still "
                        "heartbeats, and recomputes its requests elsewhere (0: off)")
    s.add_argument("--no-restart", action="store_true", help="do not restart worker processes that die")
    s.add_argument("--gpus", type=int, default=0, help="processes mode on a GPU host: split GPUs 0..N-1 among the workers")
    s.add_argument("--log-dir", help="worker process logs (processes mode); default: inherit stderr")
    s.add_argument("--no-warmup", action="store_true")
    s.add_argument("--no-gc-freeze", action="store_true",
                   help="keep start-up's objects in the garbage collector's generations (default: frozen once warm, "
                        "so full collections, which stop every engine loop, traverse only what serving allocates; "
                        "serving/gc_pauses.py)")
    s.add_argument("--gc-young-threshold", type=_non_negative, default=gc_pauses.YOUNG_THRESHOLD, metavar="N",
                   help="once warm, collect generation 0 after N net allocations (CPython's default 700; 0 keeps it): "
                        "fewer stop-the-world pauses, a sixth of the stopped time in an emulated 32-device server")
    s.add_argument("--warmup-shapes", action="store_true",
                   help="before serving, compile every program shape the scheduler limits allow (dsjax/runtime/warmup.py): "
                        "no first-compilation stalls inside served steps; ~1 min on one CPU core the first time, "
                        "then loaded from --compilation-cache")
    s.add_argument("--warmup-share", default="0/1", metavar="I/N", type=_share,
                   help="with --warmup-shapes: this server (or worker) is replica I of N warming the same shapes into one "
                        "--compilation-cache at once; it starts at shape I/N of the list, so the N compile disjoint parts "
                        "first (the launcher sets it for its worker processes)")
    s.add_argument("--step-log", metavar="DIR", default=None,
                   help="time every served engine step into DIR/<worker>.jsonl (serving/step_log.py); "
                        "`python -m dsjax.plan fit-served` turns the logs into a latency profile")
    s.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--compilation-cache", default=os.path.expanduser("~/.cache/dsjax/jax-serve"),
                   help="JAX persistent compilation cache ('' to disable)")
    s.add_argument("--log-level", default="INFO")
    for phase in ("prefill", "decode"):
        g = p.add_argument_group(f"{phase} phase")
        g.add_argument(f"--{phase}-tp", type=int, default=None, help="tensor-parallel degree (default 1)")
        g.add_argument(f"--{phase}-pp", type=int, default=None, help="pipeline degree (default 1)")
        g.add_argument(f"--{phase}-replicas", type=int, default=None, help="instances (default 1)")
    e = p.add_argument_group("engine")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--num-blocks", type=int, default=None, help="KV blocks per instance (default: room for max-num-seqs contexts)")
    e.add_argument("--max-num-seqs", type=int, default=32)
    e.add_argument("--max-prefill-tokens", type=int, default=1024)
    e.add_argument("--no-overlap-decode", dest="overlap_decode", action="store_false",
                   help="run decode steps one at a time: record a step's tokens before dispatching the next (default: "
                        "each step is dispatched behind the one in flight, hiding the host's work between steps)")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="cap on prompt + output tokens per request (default: the model's context); bounds the KV "
                        "pool's default size and the program shapes --warmup-shapes compiles")
    from dsjax.emulate import add_arguments

    add_arguments(p)
    args = p.parse_args(argv)
    if args.dtype is None and not args.emulate:
        args.dtype = "float32"
    args.model = resolve_model(args.model)
    return args


def placement_from_args(args: argparse.Namespace):
    """--plan (its mode unless --mode is given), else the per-phase flags."""
    from dsjax.engine.placement import PhaseParallel, Placement, load_plan

    def phase(name: str, base: PhaseParallel) -> PhaseParallel:
        tp, pp, n = (getattr(args, f"{name}_{k}") for k in ("tp", "pp", "replicas"))
        return PhaseParallel(tp=tp or base.tp, pp=pp or base.pp, replicas=n or base.replicas,
                             devices=base.devices if tp is pp is n is None else None)

    if args.plan:
        plan, _ = load_plan(args.plan)
        prefill, decode, mode = phase("prefill", plan.prefill), phase("decode", plan.decode), args.mode or plan.mode
    else:
        prefill, decode, mode = phase("prefill", PhaseParallel()), phase("decode", PhaseParallel()), args.mode or "disaggregated"
    if mode != "disaggregated":
        decode = prefill
    return Placement(prefill=prefill, decode=decode, mode=mode)


WORKER_ROLES = ("prefill", "decode", "replica")  # a replica: a colocated or chunked instance (--mode)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certs"]:  # `python -m dsjax.serve certs DIR`: the cluster's CA and node certificate
        from serving.certs import main as certs_main

        return certs_main(argv[1:])
    args = parse_args(argv)
    if args.port is None:
        args.port = 0 if args.role in WORKER_ROLES else 50051
    placement = placement_from_args(args)
    if args.emulate:  # emulated devices (dsjax/emulate.py): no jax, no XLA devices to make
        from dsjax.emulate import Emulation
        from serving import launcher

        try:
            emulation = Emulation.from_args(args)
        except ValueError as e:
            raise SystemExit(f"--emulate: {e}") from None
        args.dtype = emulation.dtype
        return launcher.run(args, placement, emulation=emulation)
    # Devices exist once jax starts: on a CPU host, give this process as many as it will use.
    if args.role in WORKER_ROLES:
        phase = placement.decode if args.role == "decode" else placement.prefill
        need = phase.tp * phase.pp
    else:
        need = placement.num_devices if args.workers == "inprocess" and args.role is None else 1
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags or args.role in WORKER_ROLES:
        from serving.supervisor import xla_flags_with_devices

        os.environ["XLA_FLAGS"] = xla_flags_with_devices(flags, need)
    from serving import launcher

    return launcher.run(args, placement)


if __name__ == "__main__":
    sys.exit(main())
