"""The prefill worker stages each held request's KV right after its prefill step, so a PullKV is
answered by the handler thread without waiting for the engine thread; over the staging budget it
falls back to exporting between steps. Both paths stream the same KV over real gRPC, and release
and expiry drop the staged copy."""

from concurrent import futures

import grpc
import numpy as np
import pytest

from dsjax.engine.sampling_params import SamplingParams
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.migration import export_blocks
from serving.kv_transfer import KVAssembler, descriptor_from_proto
from serving.messages import worker_request
from serving.prefill_worker import PrefillWorker
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc
from serving.worker import WorkerConfig, build_instance


@pytest.fixture(scope="module", params=[512 << 20, 0], ids=["staged", "over-budget"])
def worker(request):
    cfg = WorkerConfig(role="prefill", worker_id="p0", router="unused:0", model="tiny-llama", dummy_weights=True,
                       cache=CacheConfig(num_blocks=64, block_size=16))
    w = PrefillWorker(build_instance(cfg), worker_id="p0", max_staged_bytes=request.param)
    w.start()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(w, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield w, worker_pb2_grpc.PrefillWorkerStub(channel), request.param
    channel.close()
    server.stop(0)
    w.stop()


def test_pull_streams_the_prefilled_kv(worker):
    w, stub, budget = worker
    prompt = list(range(3, 40))  # 37 tokens: 3 blocks
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    resp = stub.Prefill(wpb.PrefillRequest(request=worker_request("r1", prompt, [], sp, 0, None)), timeout=60)
    assert resp.HasField("kv")
    assert (w.call(lambda: "r1" in w._staged)) == (budget > 0)
    asm = KVAssembler(descriptor_from_proto(resp.kv))
    for chunk in stub.PullKV(wpb.PullKVRequest(request_id="r1"), timeout=60):
        asm.add(chunk)
    k, v = asm.arrays()
    want_k, want_v = w.call(lambda: export_blocks(w.inst.runner, w.inst.blocks.block_table("r1")))
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)
    assert np.abs(k).sum() > 0
    assert w.call(lambda: w.migrations) == 1
    stub.ReleaseKV(wpb.LeaseRequest(request_ids=["r1"]), timeout=10)
    assert w.call(lambda: ("r1" in w._staged, w._staged_bytes, w.inst.blocks.num_free_blocks)) == (False, 0, 63)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.PullKV(wpb.PullKVRequest(request_id="r1"), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
