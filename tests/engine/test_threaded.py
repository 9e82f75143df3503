"""The threaded in-process disaggregated engine: same tokens as the single-loop engine, aborts
and completion free every block."""

import threading

import numpy as np
import pytest

from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.engine.request import FinishReason, Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.engine.threaded import ThreadedDisaggEngine
from dsjax.runtime.builder import build_engine
from dsjax.runtime.kv_cache import CacheConfig

CACHE = CacheConfig(num_blocks=48, block_size=8)
SCHED = SchedulerConfig(max_num_seqs=8, max_prefill_tokens=32)


def make(prompts, max_tokens=8):
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [Request(request_id=f"t{i}", prompt_token_ids=p, sampling=sp, seed=0) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [[int(x) for x in rng.integers(0, 500, int(n))] for n in rng.integers(2, 30, 10)]


@pytest.mark.parametrize("placement", [
    Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel()),
    Placement(prefill=PhaseParallel(replicas=2), decode=PhaseParallel(replicas=2)),
], ids=["p-tp2/d-tp1", "2p/2d"])
def test_threaded_matches_single_loop(tiny_llama, prompts, placement):
    model, params = tiny_llama
    want = make(prompts)
    sync = build_engine(model, params, placement=placement, mode="disaggregated", cache=CACHE, scheduler=SCHED)
    for r in want:
        sync.add_request(r)
    while sync.has_unfinished():
        sync.step()
    engine = build_engine(model, params, placement=placement, mode="disaggregated", cache=CACHE, scheduler=SCHED)
    updates = []
    got = make(prompts)
    with ThreadedDisaggEngine(engine, on_update=lambda rs: updates.extend(r.request_id for r in rs)) as threaded:
        for r in got:
            threaded.add_request(r)
        assert threaded.wait(timeout=120)
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in want]
    assert all(r.finish_reason is FinishReason.LENGTH for r in got)
    assert set(updates) == {r.request_id for r in got}
    for inst in engine.prefill + engine.decode:
        assert inst.blocks.num_free_blocks == CACHE.num_blocks - 1
        inst.blocks.check_invariants()
    assert not any(inst.staged for inst in engine.prefill)


def test_threaded_abort_frees_blocks(tiny_llama, prompts):
    model, params = tiny_llama
    engine = build_engine(model, params, placement=Placement(prefill=PhaseParallel(), decode=PhaseParallel()),
                          mode="disaggregated", cache=CACHE, scheduler=SCHED)
    reqs = make(prompts, max_tokens=40)
    with ThreadedDisaggEngine(engine) as threaded:
        for r in reqs:
            threaded.add_request(r)
        for r in reqs[::2]:
            threaded.abort(r.request_id)
        assert threaded.wait(timeout=120)
    assert all(r.finish_reason is FinishReason.CANCELLED for r in reqs[::2])
    assert all(r.finish_reason is FinishReason.LENGTH and len(r.output_token_ids) == 40 for r in reqs[1::2])
    for inst in engine.prefill + engine.decode:
        assert inst.blocks.num_free_blocks == CACHE.num_blocks - 1
        inst.blocks.check_invariants()
    assert not any(inst.staged for inst in engine.prefill)


class _CountingCondition(threading.Condition):
    """A condition that counts the times its waiter was woken (or timed out)."""

    def __init__(self, lock):
        super().__init__(lock)
        self.wakeups = 0

    def wait(self, timeout=None):
        got = super().wait(timeout)
        self.wakeups += 1
        return got


def test_an_idle_instance_thread_sleeps_through_the_others_steps():
    """One request on three emulated decode instances: the two that never pull it are not woken by
    its 40 decode steps (each woke every thread when one condition was shared)."""
    from tests.support.emulated import fixed_step_disagg_engine

    engine = fixed_step_disagg_engine(SchedulerConfig(max_num_seqs=8, max_prefill_tokens=256), num_decode=3, step_ms=2.0)
    threaded = ThreadedDisaggEngine(engine)
    counted = {key: _CountingCondition(threaded._lock) for key in threaded._decode_cv}
    threaded._decode_cv.update(counted)
    (req,) = make([[5] * 20], max_tokens=40)
    with threaded:
        threaded.add_request(req)
        assert threaded.wait(timeout=30)
        woken = sorted(counted[id(d)].wakeups for d in engine.decode)
    assert req.finish_reason is FinishReason.LENGTH and len(req.output_token_ids) == 40
    assert sum(d.migrations for d in engine.decode) == 1
    assert woken[:2] == [0, 0], woken  # the idle two; the third woke to pull the request
    assert woken[2] <= 2, woken
