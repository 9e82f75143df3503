"""The disaggregated engine schedules as the planner's simulator does (issue #17's fidelity fixes):
a pipelined prefill instance takes a new batch as soon as its first stage frees, a busy prefill
instance with an empty queue is not idle, and decode instances are loaded by reserved KV."""

import time

from dsjax.engine.disaggregated import DecodeInstance, DisaggEngine, PrefillInstance
from dsjax.engine.request import Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.engine.threaded import ThreadedDisaggEngine
from dsjax.runtime.emulated import EmulatedRunner
from dsjax.runtime.kv_cache import CacheConfig
from models.config import PRESETS

STAGE_S = 0.06


class _Const:
    """Every prefill stage STAGE_S, every decode step 1 ms."""

    def prefill_stage_s(self, *a, **k):
        return STAGE_S

    def decode_step_s(self, *a, **k):
        return 0.001

    def mixed_step_s(self, *a, **k):
        return STAGE_S


def _runner(pp=1, clock=time.monotonic, sleep=time.sleep):
    return EmulatedRunner(PRESETS["opt-13b"], CacheConfig(num_blocks=512, block_size=16), _Const(), pp=pp,
                          clock=clock, sleep=sleep)


def _req(i, prompt=32, out=2):
    return Request(request_id=f"r{i}", prompt_token_ids=[7] * prompt, sampling=SamplingParams(max_tokens=out),
                   seed=0, eos_token_ids=())


def test_a_busy_prefill_instance_is_not_idle_and_decode_load_is_reserved_kv():
    now = [0.0]
    cfg = SchedulerConfig()
    prefill = [PrefillInstance(_runner(clock=lambda: now[0], sleep=lambda s: None), cfg) for _ in range(2)]
    decode = [DecodeInstance(_runner(clock=lambda: now[0], sleep=lambda s: None), cfg) for _ in range(2)]
    engine = DisaggEngine(prefill, decode)
    engine.add_request(_req(0))
    assert len(prefill[0].waiting) == 1
    pending = prefill[0].launch()  # running now: its queue is empty but it is busy
    assert prefill[0].load() == 32 and not prefill[0].waiting
    engine.add_request(_req(1))
    assert len(prefill[1].waiting) == 1  # not behind the busy one
    prefill[0].complete(pending, prefill[0].runner.collect(pending[1]))
    assert prefill[0].load() == 0
    short, long = _req(2, prompt=32, out=500), _req(3, prompt=64, out=2)
    decode[0].running.append(short)
    decode[1].running.append(long)
    assert (decode[0].load(), decode[1].load()) == (532, 66)  # by prompt + max_tokens, not tokens so far


def _prefilled_at(n_stages: int, gap_s: float) -> list[float]:
    """First-token times of two requests sent gap_s apart to one threaded prefill instance."""
    engine = DisaggEngine([PrefillInstance(_runner(pp=n_stages), SchedulerConfig())],
                          [DecodeInstance(_runner(), SchedulerConfig())])
    reqs = [_req(0), _req(1)]
    with ThreadedDisaggEngine(engine) as threaded:
        t0 = time.perf_counter()
        threaded.add_request(reqs[0])
        time.sleep(gap_s)
        threaded.add_request(reqs[1])
        assert threaded.wait(timeout=5)
    return [r.lifecycle.prefill_end - t0 for r in reqs]


def test_a_pipelined_prefill_starts_the_next_batch_when_its_first_stage_frees():
    """pp=2, 60 ms a stage: A runs [0, 60) then [60, 120); B, sent at 10 ms, enters stage 0 at
    60 ms and leaves at 180 ms (the simulator's answer). Waiting for A's whole group first, as
    the engine did, finished B at 240 ms."""
    a, b = _prefilled_at(2, 0.01)
    assert 0.115 < a < 0.16
    assert 0.175 < b < 0.225, b
