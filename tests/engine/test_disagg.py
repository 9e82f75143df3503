"""Disaggregated and colocated engines on 8 fake CPU devices give the same greedy tokens."""

import jax
import numpy as np
import pytest

from dsjax.engine.disaggregated import DisaggEngine
from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.engine.request import FinishReason, Request, Status
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.runtime.builder import build_engine
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.migration import pieces
from tests.support.emulated import fixed_step_disagg_engine

CACHE = CacheConfig(num_blocks=48, block_size=8)
SCHED = SchedulerConfig(max_num_seqs=8, max_prefill_tokens=128)
MAX_TOKENS = 8


def P(tp=1, pp=1, n=1):
    return PhaseParallel(tp=tp, pp=pp, replicas=n)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [[int(x) for x in rng.integers(0, 500, n)] for n in (3, 8, 9, 17)]


def run(engine, prompts, max_tokens=MAX_TOKENS):
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    reqs = drive(engine, [Request(request_id=f"r{i}", prompt_token_ids=p, sampling=sp, seed=0) for i, p in enumerate(prompts)])
    assert all(r.finish_reason is FinishReason.LENGTH for r in reqs)
    return [r.output_token_ids for r in reqs]


def drive(engine, reqs):
    """Add `reqs` and step the engine until every one has finished."""
    for r in reqs:
        engine.add_request(r)
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished()
    return reqs


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts):
    model, params = tiny_llama
    return run(build_engine(model, params, placement=None, mode="colocated", cache=CACHE, scheduler=SCHED), prompts)


def device_ids(runner):
    return {d.id for d in runner.devices()}


CONFIGS = {
    "colocated-tp1": (Placement.colocated(tp=1), "colocated"),
    "p-tp2/d-tp1": (Placement(prefill=P(tp=2), decode=P(tp=1)), "disaggregated"),
    "p-tp1pp2/d-tp2": (Placement(prefill=P(pp=2), decode=P(tp=2)), "disaggregated"),
    "p-tp2/d-tp2pp2": (Placement(prefill=P(tp=2), decode=P(tp=2, pp=2)), "disaggregated"),
    "2p/1d": (Placement(prefill=P(n=2), decode=P()), "disaggregated"),
    "chunked-tp2": (Placement.colocated(tp=2, mode="chunked"), "chunked"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_greedy_tokens_everywhere(name, tiny_llama, prompts, reference):
    model, params = tiny_llama
    placement, mode = CONFIGS[name]
    sched = SchedulerConfig(max_num_seqs=8, max_prefill_tokens=16) if mode == "chunked" else SCHED
    engine = build_engine(model, params, placement=placement, mode=mode, cache=CACHE, scheduler=sched)
    assert run(engine, prompts) == reference
    if isinstance(engine, DisaggEngine):
        pre = set().union(*(device_ids(i.runner) for i in engine.prefill))
        dec = set().union(*(device_ids(i.runner) for i in engine.decode))
        assert pre and dec and not pre & dec, (pre, dec)
        assert len(pre) == placement.prefill.num_devices and len(dec) == placement.decode.num_devices
        # every pool lives on its own instance's devices, sharded over heads by its TP
        for inst in engine.prefill + engine.decode:
            for stage in inst.runner.stages:
                k = stage.cache.k[0]
                assert {d.id for d in k.sharding.device_set} == {d.id for d in stage.mesh.devices.flat}
                assert k.sharding.shard_shape(k.shape)[1] == model.config.num_kv_heads // stage.mesh.size
        for inst in engine.prefill + engine.decode:
            assert inst.blocks.num_free_blocks == CACHE.num_blocks - 1
            inst.blocks.check_invariants()


def test_migration_moves_exactly_the_requests_blocks(tiny_llama, prompts):
    model, params = tiny_llama
    engine = build_engine(model, params, placement=Placement(prefill=P(tp=2), decode=P(tp=1)), mode="disaggregated", cache=CACHE, scheduler=SCHED)
    run(engine, prompts)
    cfg = model.config
    expected = 0
    for p in prompts:
        blocks = -(-len(p) // CACHE.block_size)
        expected += 2 * cfg.num_layers * blocks * CACHE.block_size * cfg.num_kv_heads * cfg.head_dim * 4
    assert engine.decode[0].bytes_pulled == expected
    assert engine.decode[0].migrations == len(prompts)


def test_burst_with_small_decode_memory_drops_nothing(tiny_llama):
    """Many requests at once, decode pool far smaller than the load: prefill memory buffers them,
    prefill stops admitting when full, everything finishes, every pool is whole again."""
    model, params = tiny_llama
    rng = np.random.default_rng(5)
    burst = [[int(x) for x in rng.integers(0, 500, int(n))] for n in rng.integers(4, 20, 24)]
    engine = build_engine(
        model, params, placement=Placement(prefill=P(tp=2), decode=P(tp=1)), mode="disaggregated",
        cache=CacheConfig(num_blocks=16, block_size=8), scheduler=SchedulerConfig(max_num_seqs=4, max_prefill_tokens=64),
    )
    pulled_at_once = []
    orig_pull = engine._pull

    def spy():
        orig_pull()
        pulled_at_once.append(len(engine.decode[0].running))

    engine._pull = spy
    outs = run(engine, burst, max_tokens=6)
    assert all(len(o) == 6 for o in outs)
    assert max(pulled_at_once) <= 15  # bounded by the decode pool, not by the burst
    for inst in engine.prefill + engine.decode:
        assert inst.blocks.num_free_blocks == 15
        inst.blocks.check_invariants()


def test_overlapped_decode_gives_the_same_tokens_sampled_and_stopped(tiny_llama, prompts):
    """Decode steps dispatched behind the one in flight (input tokens fed on the device) sample
    the same tokens as steps one at a time, with per-request seeds, and a request that stops on a
    stop id mid-flight ends there, its extra step's token dropped and its blocks freed."""
    model, params = tiny_llama

    def outputs(overlap, stop=None):
        engine = build_engine(model, params, placement=Placement(prefill=P(), decode=P(tp=2)), mode="disaggregated",
                              cache=CACHE, scheduler=SCHED)
        for inst in engine.decode:
            inst.overlap = overlap
        sps = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_k=40),
               SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=stop or ()),
               SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.8),
               SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)]
        reqs = drive(engine, [Request(request_id=f"r{i}", prompt_token_ids=p, sampling=sp, seed=7 + i)
                              for i, (p, sp) in enumerate(zip(prompts, sps))])
        for inst in engine.prefill + engine.decode:
            assert inst.blocks.num_free_blocks == CACHE.num_blocks - 1
            inst.blocks.check_invariants()
        assert all(d.inflight is None for d in engine.decode)
        return [(r.output_token_ids, r.finish_reason) for r in reqs]

    serial = outputs(False)
    assert outputs(True) == serial
    stop = serial[1][0][3]  # the greedy request's 4th token: it ends there
    stopped = outputs(True, stop=[stop])
    assert stopped == outputs(False, stop=[stop])
    assert stopped[1][1] is FinishReason.STOP and stopped[1][0] == serial[1][0][: serial[1][0].index(stop) + 1]


def test_pieces_cover_exactly():
    for n in range(0, 70):
        ps = pieces(n)
        assert sum(b - a for a, b in ps) == n and all((b - a) & (b - a - 1) == 0 and b - a <= 16 for a, b in ps)


def test_a_request_released_while_queued_leaves_the_prefill_queue_whatever_its_status():
    """The prefill worker marks a cancelled request FINISHED, then releases it: it must leave the
    waiting queue, or a later batch prefills it into blocks nobody frees (a leak a cluster test
    caught as 3 blocks held on prefill-0 after cancels)."""
    engine = fixed_step_disagg_engine(SchedulerConfig(max_num_seqs=8, max_prefill_tokens=512))
    inst = engine.prefill[0]
    kept, cancelled = (Request(request_id=f"r{i}", prompt_token_ids=[3] * 40, seed=0, sampling=SamplingParams(max_tokens=5))
                       for i in range(2))
    engine.add_request(kept)
    engine.add_request(cancelled)
    cancelled.status = Status.FINISHED  # serving/prefill_worker.py, a Prefill call ended early
    inst.release(cancelled)
    assert list(inst.waiting) == [kept]
    batches, _ = inst.launch()
    assert [r.request_id for b in batches for r in b] == ["r0"]
    assert inst.blocks.num_free_blocks == inst.blocks.capacity_blocks - 3  # only r0's 40 prompt tokens, 3 blocks of 16
