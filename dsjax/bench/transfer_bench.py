"""KV transfer over gRPC on loopback, against a raw TCP copy of the same bytes, and the share of
the transfer in end-to-end latency for a 512-token prompt.

    python -m dsjax.bench transfer                      # throughput: gRPC KVChunk stream vs TCP
    python -m dsjax.bench transfer --e2e                # + a small-llama cluster, 512-token prompts
    python -m dsjax.bench transfer --model-shape llama-2-7b --tokens 512 --chunk-mib 1 4 16

Throughput: a sender process holds one request's host KV (the shape of `--model-shape`'s KV for
`--tokens` tokens) and serves it (a) through the real `PullKV` path (serving/kv_transfer.py:
chunks of `--chunk-mib`, protobuf, HTTP/2) into a `KVAssembler`, and (b) as raw bytes over a
TCP socket into a preallocated buffer. Each is timed from the request to the last byte in place
on the receiver, best of `--repeats`. The sender is a separate process, as between workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import time
from concurrent import futures

import numpy as np

from dsjax.runtime.migration import KVDescriptor
from models.config import PRESETS


def descriptor(model: str, tokens: int, dtype: str, block_size: int = 16) -> KVDescriptor:
    c = PRESETS[model]
    return KVDescriptor(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, block_size=block_size,
                        num_tokens=tokens, dtype=dtype)


def _host_kv(d: KVDescriptor):
    shape = (d.num_layers, d.num_blocks, d.num_kv_heads, d.block_size, d.head_dim)
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape, np.float32).astype(d.dtype), rng.standard_normal(shape, np.float32).astype(d.dtype)


def _sender(d: KVDescriptor, grpc_port, tcp_port, ready) -> None:
    """Child process: serve the KV by PullKV (gRPC) and by a raw socket (TCP), until killed."""
    import threading

    import grpc

    from serving.channels import SERVER_OPTIONS
    from serving.kv_transfer import to_chunks
    from serving.proto.dsjax.v1 import worker_pb2_grpc

    k, v = _host_kv(d)

    class Servicer(worker_pb2_grpc.PrefillWorkerServicer):
        def PullKV(self, request, context):  # noqa: N802
            yield from to_chunks(d, k, v, request.max_chunk_bytes)

    server = grpc.server(futures.ThreadPoolExecutor(4), options=SERVER_OPTIONS)
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(Servicer(), server)
    grpc_port.value = server.add_insecure_port("127.0.0.1:0")
    server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    tcp_port.value = listener.getsockname()[1]

    def tcp():
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1)
                conn.sendall(memoryview(k).cast("B"))
                conn.sendall(memoryview(v).cast("B"))

    threading.Thread(target=tcp, daemon=True).start()
    ready.set()
    threading.Event().wait()


def pull_grpc(port: int, d: KVDescriptor, chunk_bytes: int) -> float:
    import grpc

    from serving.channels import OPTIONS
    from serving.kv_transfer import KVAssembler
    from serving.proto.dsjax.v1 import worker_pb2 as wpb
    from serving.proto.dsjax.v1 import worker_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        grpc.channel_ready_future(ch).result(timeout=10)
        t = time.perf_counter()
        asm = KVAssembler(d)
        for chunk in stub.PullKV(wpb.PullKVRequest(request_id="bench", max_chunk_bytes=chunk_bytes)):
            asm.add(chunk)
        asm.arrays()
        return time.perf_counter() - t


def pull_tcp(port: int, nbytes: int) -> float:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as s:
        t = time.perf_counter()
        s.sendall(b"x")
        got = 0
        while got < nbytes:
            n = s.recv_into(view[got:], min(nbytes - got, 16 << 20))
            if n == 0:
                raise ConnectionError(f"sender closed after {got} of {nbytes} bytes")
            got += n
        return time.perf_counter() - t


def throughput(d: KVDescriptor, chunk_mib: list[float], repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    grpc_port, tcp_port, ready = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Event()
    proc = ctx.Process(target=_sender, args=(d, grpc_port, tcp_port, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("sender did not start")
        gb = d.nbytes / 1e9
        out = {"kv_bytes": d.nbytes}
        tcp = [pull_tcp(tcp_port.value, d.nbytes) for _ in range(repeats)]
        out["tcp_GBps"] = gb / min(tcp)
        for mib in chunk_mib:
            times = [pull_grpc(grpc_port.value, d, int(mib * 2**20)) for _ in range(repeats)]
            out[f"grpc_{mib:g}MiB_GBps"] = gb / min(times)
            out[f"grpc_{mib:g}MiB_median_s"] = statistics.median(times)
        return out
    finally:
        proc.kill()


def end_to_end(model: str, prompt_len: int, max_tokens: int, requests: int) -> dict:
    """A processes-mode cluster (1 prefill, 1 decode worker); sequential 512-token prompts."""
    import grpc

    from dsjax.bench.servers import free_port, launch_server, stop_server, wait_serving
    from serving.proto.dsjax.v1 import dsjax_pb2 as pb
    from serving.proto.dsjax.v1 import dsjax_pb2_grpc

    port = free_port()
    proc = launch_server(["--workers", "processes", "--model", model, "--port", str(port), "--metrics-port", "-1", "--http-port", "0", "--log-level", "WARNING"])
    rows = []
    try:
        wait_serving(f"localhost:{port}", timeout=300, proc=proc)
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(f"localhost:{port}") as ch:
            stub = dsjax_pb2_grpc.GenerationStub(ch)
            for i in range(requests + 1):  # the first compiles the 512-token buckets: dropped
                ids = [int(t) for t in rng.integers(0, 256, prompt_len)]
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
                last = list(stub.Generate(req, timeout=600))[-1]
                if i:
                    b, t = last.breakdown, last.timing
                    rows.append({"e2e_s": t.time - t.arrival_time, "ttft_s": t.first_token_time - t.arrival_time,
                                 "prefill_s": b.prefill_seconds, "transfer_s": b.transfer_seconds, "decode_s": b.decode_seconds,
                                 "kv_bytes": b.kv_bytes})
    finally:
        stop_server(proc)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["transfer_share_of_e2e"] = med["transfer_s"] / med["e2e_s"]
    return {"model": model, "prompt_len": prompt_len, "max_tokens": max_tokens, "requests": requests, "median": med}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dsjax.bench transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", default="llama-2-7b", help="preset whose KV shape to move")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--chunk-mib", type=float, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--e2e", action="store_true", help="also time a real cluster end to end")
    p.add_argument("--e2e-model", default="small-llama")
    p.add_argument("--e2e-requests", type=int, default=5)
    p.add_argument("--e2e-max-tokens", type=int, default=32)
    args = p.parse_args(argv)
    d = descriptor(args.model_shape, args.tokens, args.dtype)
    result = {"throughput": throughput(d, args.chunk_mib, args.repeats)}
    result["throughput"]["descriptor"] = {"model_shape": args.model_shape, "tokens": args.tokens, "dtype": args.dtype,
                                          "layers": d.num_layers, "kv_heads": d.num_kv_heads, "head_dim": d.head_dim}
    if args.e2e:
        result["end_to_end"] = end_to_end(args.e2e_model, args.tokens, args.e2e_max_tokens, args.e2e_requests)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
