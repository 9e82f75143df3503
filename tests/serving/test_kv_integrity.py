"""KV integrity end to end over real gRPC: a decode worker pulling from a prefill worker whose
KV stream is corrupted on the way refuses it (checksum), fails the request with ABORTED (the router
then recomputes it), frees every block, and decodes the next, intact transfer to the same tokens a
clean transfer gives."""

import time
from concurrent import futures

import grpc
import pytest

from dsjax.engine.sampling_params import SamplingParams
from dsjax.runtime.kv_cache import CacheConfig
from serving.decode_worker import DecodeWorker
from serving.messages import worker_request
from serving.prefill_worker import PrefillWorker
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.worker import WorkerConfig, build_instance

CACHE = CacheConfig(num_blocks=64, block_size=16)


class _CorruptingPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    """The real prefill worker behind a wire that flips one bit of the first KV chunk while
    `corrupt` is set (as a faulty NIC or a bad buffer would)."""

    def __init__(self, inner: PrefillWorker):
        self.inner, self.corrupt = inner, False

    def Prefill(self, request, context):  # noqa: N802
        return self.inner.Prefill(request, context)

    def RenewLease(self, request, context):  # noqa: N802
        return self.inner.RenewLease(request, context)

    def ReleaseKV(self, request, context):  # noqa: N802
        return self.inner.ReleaseKV(request, context)

    def PullKV(self, request, context):  # noqa: N802
        for i, chunk in enumerate(self.inner.PullKV(request, context)):
            if self.corrupt and i == 0:
                k = bytearray(chunk.k)
                k[len(k) // 3] ^= 0x04
                chunk.k = bytes(k)
            yield chunk


def _serve(add, servicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(8))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def workers():
    def config(role):
        return WorkerConfig(role=role, worker_id=f"{role[0]}0", router="unused:0", model="tiny-llama", dummy_weights=True, cache=CACHE)

    prefill = PrefillWorker(build_instance(config("prefill")), worker_id="p0")
    decode = DecodeWorker(build_instance(config("decode")), worker_id="d0")
    prefill.start()
    decode.start()
    wire = _CorruptingPrefill(prefill)
    p_server, p_addr = _serve(worker_pb2_grpc.add_PrefillWorkerServicer_to_server, wire)
    d_server, d_addr = _serve(worker_pb2_grpc.add_DecodeWorkerServicer_to_server, decode)
    with grpc.insecure_channel(p_addr) as pc, grpc.insecure_channel(d_addr) as dc:
        yield wire, decode, p_addr, worker_pb2_grpc.PrefillWorkerStub(pc), worker_pb2_grpc.DecodeWorkerStub(dc), prefill
    p_server.stop(0)
    d_server.stop(0)
    prefill.stop()
    decode.stop()


def _generate(workers, rid: str) -> list[int]:
    wire, _, p_addr, prefill, decode, _ = workers
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = list(range(5, 45))
    resp = prefill.Prefill(wpb.PrefillRequest(request=worker_request(rid, prompt, [], sp, 0, None)), timeout=60)
    req = worker_request(rid, prompt, [resp.token_id], sp, 0, None)
    source = wpb.KVSource(worker_id="p0", address=p_addr, kv=resp.kv, lease_ms=resp.lease_ms)
    out = [resp.token_id]
    for msg in decode.Decode(wpb.DecodeRequest(request=req, source=source), timeout=60):
        out += msg.token_ids
    return out


def test_corrupted_kv_is_refused_and_nothing_leaks(workers):
    wire, decode_worker, *_, prefill_worker = workers
    clean = _generate(workers, "clean#0")
    assert len(clean) == 6
    wire.corrupt = True
    with pytest.raises(grpc.RpcError) as e:
        _generate(workers, "bad#0")
    assert e.value.code() == grpc.StatusCode.ABORTED and "checksum" in e.value.details()
    assert decode_worker.stats().kv_checksum_failures == 1  # counted (Admin/Instances, /metrics)
    blocks = decode_worker.inst.blocks
    assert decode_worker.call(lambda: blocks.num_free_blocks == blocks.capacity_blocks)
    held = prefill_worker.inst.blocks  # the decode worker released the source copy (asynchronously)
    deadline = time.monotonic() + 10
    while not prefill_worker.call(lambda: held.num_free_blocks == held.capacity_blocks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prefill_worker.call(lambda: held.num_free_blocks == held.capacity_blocks)
    wire.corrupt = False
    assert _generate(workers, "again#0") == clean  # the recompute the router would do: same tokens
