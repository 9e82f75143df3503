"""The router in front of in-process engines (`--workers inprocess`): a chunked colocated engine
on the engine-loop backend and a disaggregated engine (prefill TP2, decode TP1 on this process's
fake devices) on the threaded backend give the offline engine's greedy tokens; a cancelled
request frees its blocks."""

import concurrent.futures as cf

import grpc
import jax
import numpy as np
import pytest

import dsjax
from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.runtime.builder import build_engine
from dsjax.runtime.kv_cache import CacheConfig
from models.tokenizer import ByteTokenizer
from models.transformer import CausalLM
from models.weights import load_model
from serving.inprocess import InProcessBackend, ThreadedBackend
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.router import RouterServer
from tests.support.serving import wait_idle, wait_serving

CACHE = CacheConfig(num_blocks=96, block_size=16)
SCHED = SchedulerConfig(max_num_seqs=16, max_prefill_tokens=256)
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def weights():
    import jax.numpy as jnp

    config, params = load_model("tiny-llama", dtype=jnp.float32, dummy_weights=True, seed=0)
    return CausalLM(config=config, dtype=jnp.float32), params


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [[int(t) for t in rng.integers(0, 500, int(n))] for n in rng.integers(2, 40, 12)]


@pytest.fixture(scope="module")
def reference(prompts):
    llm = dsjax.LLM(model="tiny-llama", dummy_weights=True, dtype="float32", num_blocks=96)
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))]


def serve(backend, model):
    router = RouterServer(backend, ByteTokenizer(model.config.vocab_size), model.config, port=0, host="localhost").start()
    wait_serving(f"localhost:{router.port}", timeout=30)
    return router


@pytest.fixture(scope="module", params=["chunked", "disaggregated"])
def server(request, weights):
    model, params = weights
    if request.param == "chunked":
        backend = InProcessBackend(build_engine(model, params, placement=None, mode="chunked", cache=CACHE, scheduler=SCHED))
    else:
        placement = Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel(tp=1))
        backend = ThreadedBackend(build_engine(model, params, placement=placement, mode="disaggregated", cache=CACHE,
                                               scheduler=SCHED, devices=jax.devices()[:3]))
    backend.start()
    backend.warm = True
    router = serve(backend, model)
    try:
        yield f"localhost:{router.port}"
    finally:
        router.stop(0)
        backend.close()


def test_concurrent_requests_match_offline(server, prompts, reference):
    def run(p):
        with grpc.insecure_channel(server) as ch:
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
            msgs = list(dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=60))
        return [t for m in msgs for t in m.token_ids], msgs[-1].finish_reason

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(run, prompts))
    assert [ids for ids, _ in outs] == reference
    assert all(reason == pb.LENGTH for _, reason in outs)
    wait_idle(server)


def test_cancel_frees_blocks(server):
    with grpc.insecure_channel(server) as ch:
        calls = [dsjax_pb2_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[256, i + 3] * 10), sampling=pb.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)))
            for i in range(4)]
        for i, c in enumerate(calls):
            for _ in range(i):
                next(c)
            c.cancel()
        wait_idle(server)


def test_a_failing_engine_command_fails_its_request_not_the_loop(weights):
    """An unexpected error while the engine thread adds a request ends that request with
    INTERNAL; the loop, and every other request, goes on."""
    model, params = weights
    engine = build_engine(model, params, placement=None, mode="colocated", cache=CACHE, scheduler=SCHED)
    add = engine.add_request

    def flaky(req):
        if req.request_id == "boom":
            raise RuntimeError("simulated engine bug")
        add(req)

    engine.add_request = flaky
    backend = InProcessBackend(engine)
    backend.start()
    backend.warm = True
    router = serve(backend, model)
    try:
        with grpc.insecure_channel(f"localhost:{router.port}") as ch:
            stub = dsjax_pb2_grpc.GenerationStub(ch)
            sampling = pb.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(request_id="boom", token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=sampling), timeout=30))
            assert e.value.code() == grpc.StatusCode.INTERNAL and "simulated engine bug" in e.value.details()
            msgs = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=sampling), timeout=60))
            assert sum(len(m.token_ids) for m in msgs) == 4
        assert backend.alive and backend.error is None
        stats = backend.instances()
        assert all(s.free_blocks == s.num_blocks for s in stats)
    finally:
        router.stop(0)
        backend.close()


class _GrowsWhileRead(list):
    """A request's output tokens that another instance thread extends right after a reader slices
    them: `on_slice()` runs between the slice and the reader's next look."""

    def __init__(self, items, on_slice):
        super().__init__(items)
        self.on_slice = on_slice

    def __getitem__(self, i):
        got = super().__getitem__(i)
        if isinstance(i, slice) and self.on_slice is not None:
            hook, self.on_slice = self.on_slice, None
            hook(self)
        return got


@pytest.mark.parametrize("finishes_during_read", [False, True], ids=["appended", "appended-and-finished"])
def test_a_token_recorded_while_an_update_reads_its_request_is_streamed(finishes_during_read):
    """The threaded backend's update (a prefill collector's, running after decode took the request)
    can read a request while the decode thread appends to it: no token is lost, none sent twice."""
    from dsjax.engine.request import FinishReason, Request, Status
    from serving.engine_loop import FinishEvent, Outbox, TokenEvent
    from serving.inprocess import _Active
    from tests.support.emulated import fixed_step_disagg_engine

    backend = ThreadedBackend(fixed_step_disagg_engine(SCHED, num_blocks=8))
    req = Request(request_id="r", prompt_token_ids=[5, 6], sampling=SamplingParams(max_tokens=3), seed=0)
    outbox = Outbox()
    backend._active["r"] = _Active(req, outbox)

    def decode_thread_records(out):
        out.append(12)
        if finishes_during_read:
            out.append(13)
            req.status, req.finish_reason = Status.FINISHED, FinishReason.LENGTH

    req.output_token_ids = _GrowsWhileRead([11], decode_thread_records)
    backend._on_update([req])  # the prefill collector's update
    if not finishes_during_read:
        req.output_token_ids.append(13)
        req.status, req.finish_reason = Status.FINISHED, FinishReason.LENGTH
    backend._on_update([req])  # the decode thread's update of its last step
    events = outbox.drain()
    assert [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids] == [11, 12, 13]
    assert isinstance(events[-1], FinishEvent) and events[-1].reason is FinishReason.LENGTH
    assert "r" not in backend._active
