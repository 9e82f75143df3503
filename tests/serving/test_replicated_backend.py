"""Emulated colocated replicas, one engine thread each (serving/replicated.py): a replica's step
never waits for another's, and requests go to the replica with the least reserved KV."""

import time

from dsjax.engine.colocated import ColocatedEngine
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.runtime.emulated import EmulatedRunner
from dsjax.runtime.kv_cache import CacheConfig
from models.config import PRESETS
from serving.backend import GenerateJob
from serving.engine_loop import FinishEvent, TokenEvent
from serving.replicated import ReplicatedBackend


class _Slow:
    def prefill_stage_s(self, *a, **k):
        return 0.15

    def decode_step_s(self, *a, **k):
        return 0.01

    def mixed_step_s(self, *a, **k):
        return 0.15


def _job(i, prompt, out):
    return GenerateJob(request_id=f"r{i}", prompt_token_ids=[5] * prompt, sampling=SamplingParams(max_tokens=out),
                       seed=0, eos_token_ids=())


def test_replicas_step_in_parallel_and_dispatch_by_reserved_kv():
    engines = [ColocatedEngine(EmulatedRunner(PRESETS["opt-13b"], CacheConfig(num_blocks=256, block_size=16), _Slow()),
                               SchedulerConfig()) for _ in range(3)]
    backend = ReplicatedBackend(engines)
    backend.start()
    backend.warm = True
    try:
        assert backend.ready() and len(backend.instances()) == 3
        t0 = time.perf_counter()
        handles = [backend.submit(_job(0, 100, 3)), backend.submit(_job(1, 20, 3)), backend.submit(_job(2, 40, 3))]
        assert backend._load == [103, 23, 43]  # prompt + max_tokens, each to an empty replica
        backend.submit(_job(3, 10, 1))  # the least loaded now: the second replica
        assert backend._load == [103, 34, 43]
        firsts = []
        for h in handles:
            events = list(h.events())
            assert isinstance(events[-1], FinishEvent)
            assert sum(len(e.token_ids) for e in events if isinstance(e, TokenEvent)) == 3
            firsts.append(time.perf_counter() - t0)
        assert max(firsts) < 0.4  # three 150 ms prefills side by side, not one after another (>= 0.45 s)
        deadline = time.perf_counter() + 2
        while backend._load != [0, 0, 0] and time.perf_counter() < deadline:  # r3 finishing on its own
            time.sleep(0.01)
        assert backend._load == [0, 0, 0]
    finally:
        backend.close()
