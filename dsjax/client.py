"""`python -m dsjax.client "prompt"`: stream a generation from a dsjax server to the terminal.

    python -m dsjax.client "Once upon a time" --max-tokens 64 --temperature 0.8
    python -m dsjax.client --token-ids 256,72,105 --max-tokens 8 --temperature 0 --show-tokens
    python -m dsjax.client --target host:50051 --wait 60 "hello"    # wait for the server to be up
    python -m dsjax.client --tls-ca ca.pem --target host:50051 "hi"  # a server with --api-tls-cert

Text goes to stdout as it arrives; the finish reason and latencies (TTFT, TPOT) go to stderr. A
failed request prints its gRPC status and message and exits with 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsjax.client", description="Stream a generation from a dsjax server.")
    p.add_argument("prompt", nargs="?", help="text prompt (or use --token-ids)")
    p.add_argument("--token-ids", help="comma-separated prompt token ids instead of text")
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--request-id", default="")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the server to report SERVING")
    p.add_argument("--show-tokens", action="store_true", help="print the token ids to stderr at the end")
    p.add_argument("--api-key", default=os.environ.get("DSJAX_API_KEY") or None,
                   help="sent as `authorization: Bearer KEY` (a server started with --api-key; default $DSJAX_API_KEY)")
    p.add_argument("--tls-ca", metavar="FILE", default=None,
                   help="connect over TLS, trusting the CA certificates in FILE (PEM; a server with --api-tls-cert)")
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.token_ids is None):
        p.error("give a text prompt or --token-ids (exactly one)")
    return args


def build_request(args: argparse.Namespace):
    from serving.proto.dsjax.v1 import dsjax_pb2 as pb

    sampling = pb.SamplingParams(max_tokens=args.max_tokens, top_k=args.top_k, stop=args.stop, ignore_eos=args.ignore_eos)
    for name in ("temperature", "top_p", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    req = pb.GenerateRequest(request_id=args.request_id, sampling=sampling)
    if args.token_ids is not None:
        req.token_ids.ids.extend(int(t) for t in args.token_ids.split(",") if t.strip())
    else:
        req.text = args.prompt
    return req


def wait_until_serving(channel: grpc.Channel, timeout: float) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub, deadline = health_pb2_grpc.HealthStub(channel), time.monotonic() + timeout
    while True:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service="dsjax.v1.Generation"), timeout=2.0).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return True
        except grpc.RpcError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def open_channel(target: str, tls_ca: str | None) -> grpc.Channel:
    """Plaintext, or TLS trusting `tls_ca` (the server's name must match its certificate)."""
    if tls_ca is None:
        return grpc.insecure_channel(target)
    with open(tls_ca, "rb") as f:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))


def main(argv: list[str] | None = None) -> int:
    from serving.proto.dsjax.v1 import dsjax_pb2 as pb
    from serving.proto.dsjax.v1 import dsjax_pb2_grpc

    args = parse_args(argv)
    with open_channel(args.target, args.tls_ca) as channel:
        if args.wait and not wait_until_serving(channel, args.wait):
            print(f"error: {args.target} did not report SERVING within {args.wait:.0f}s", file=sys.stderr)
            return 1
        stub = dsjax_pb2_grpc.GenerationStub(channel)
        ids, last = [], None
        try:
            metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
            for msg in stub.Generate(build_request(args), timeout=args.timeout, metadata=metadata):
                ids.extend(msg.token_ids)
                if msg.text:
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                last = msg
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ncancelled", file=sys.stderr)
            return 130
    sys.stdout.write("\n")
    if last is not None:
        t = last.timing
        ttft = t.first_token_time - t.arrival_time if t.first_token_time else float("nan")
        tpot = (t.time - t.first_token_time) / (len(ids) - 1) if len(ids) > 1 else float("nan")
        print(f"[{pb.FinishReason.Name(last.finish_reason)}] {len(ids)} tokens, TTFT {ttft * 1e3:.1f} ms, "
              f"TPOT {tpot * 1e3:.1f} ms", file=sys.stderr)
        if args.show_tokens:
            print(f"token_ids: {ids}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
