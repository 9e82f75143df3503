"""A prefill worker with pp pipeline stages keeps its pipeline full: a prompt that arrives while
the first stage is busy starts as soon as that stage frees (the simulator's SimPrefillInstance),
not after the batch before it has left the last stage. Real gRPC, an emulated pp=2 instance."""

import json
import time
from concurrent import futures

import grpc
import pytest

from dsjax.emulate import Emulation
from dsjax.engine.disaggregated import PrefillInstance
from dsjax.engine.placement import PhaseParallel
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.serve import parse_args
from serving.prefill_worker import PrefillWorker
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.proto.dsjax.v1 import worker_pb2_grpc

COEFFS = {"prefill": [18.1, 0.1019, 7.12e-6], "decoding_smallbs": [19.93, 6.27e-4, 0.0385],
          "decoding_largebs": [7.17, 5.8e-4, 0.158], "decoding_large_small_bs_threshold": 95}
PROMPT = 2000  # tokens: ~126 ms a stage on OPT-13B over 2 stages


@pytest.fixture()
def stub(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"facebook/opt-13b": {"1": COEFFS}}))
    e = Emulation.from_args(parse_args(["--emulate", str(path), "--model", "opt-13b", "--emulate-devices", "2"]))
    runner = e.runner(PhaseParallel(pp=2), block_size=16, num_blocks=None, devices=[0, 1])
    worker = PrefillWorker(PrefillInstance(runner, SchedulerConfig(max_prefill_tokens=PROMPT)), worker_id="p0")
    worker.start()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield worker_pb2_grpc.PrefillWorkerStub(channel), runner.cost.prefill_stage_s(PROMPT, PROMPT**2)
    channel.close()
    server.stop(0)
    worker.stop()


def _prefill(stub, rid):
    sampling = pb.SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    req = wpb.WorkerRequest(request_id=rid, prompt_token_ids=[7] * PROMPT, sampling=sampling, seed=0)
    return stub.Prefill(wpb.PrefillRequest(request=req), timeout=10)


def test_a_second_prompt_enters_the_first_stage_as_soon_as_it_frees(stub):
    stub, stage_s = stub
    assert 0.08 < stage_s < 0.3
    with futures.ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        first = pool.submit(_prefill, stub, "a")
        time.sleep(stage_s / 4)  # the first prompt is in stage 1 of 2
        second = pool.submit(_prefill, stub, "b")
        first.result()
        t_first = time.perf_counter() - t0
        second.result()
        t_second = time.perf_counter() - t0
    assert 2 * stage_s - 0.01 <= t_first < 2.5 * stage_s
    # pipelined: the second batch runs stages [s, 2s) and [2s, 3s); one batch at a time ends at 4s
    assert 3 * stage_s - 0.01 <= t_second < 3.5 * stage_s
