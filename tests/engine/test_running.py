"""RunningRequests (dsjax/engine/running.py): a decode instance's load read in O(1) stays the sum
of its running requests' peaks through every way the engine changes the list."""

import itertools
import random

from dsjax.engine.request import Request
from dsjax.engine.running import RunningRequests
from dsjax.engine.sampling_params import SamplingParams


def req(i: int, prompt: int, max_tokens: int) -> Request:
    return Request(request_id=f"r{i}", prompt_token_ids=[3] * prompt, seed=0, sampling=SamplingParams(max_tokens=max_tokens))


def test_the_sum_follows_every_mutation():
    rng = random.Random(0)
    reqs = [req(i, rng.randint(1, 50), rng.randint(1, 30)) for i in range(40)]
    running = RunningRequests(reqs[:5])
    pool = reqs[5:]
    for step in range(400):
        op = rng.choice(["append", "remove", "pop", "pop0", "insert", "extend", "del", "set", "iadd", "clear"])
        if op == "append" and pool:
            running.append(pool.pop())
        elif op == "remove" and running:
            r = rng.choice(running)
            running.remove(r)
            pool.append(r)
        elif op in ("pop", "pop0") and running:
            pool.append(running.pop() if op == "pop" else running.pop(0))
        elif op == "insert" and pool:
            running.insert(rng.randint(0, len(running)), pool.pop())
        elif op == "extend" and len(pool) >= 2:
            running.extend([pool.pop(), pool.pop()])
        elif op == "iadd" and pool:
            running += [pool.pop()]
        elif op == "del" and running:
            pool.append(running[0])
            del running[0]
        elif op == "set" and running and pool:
            pool.append(running[0])
            running[0] = pool.pop(0)
        elif op == "clear" and step % 97 == 0:
            pool.extend(running)
            running.clear()
        assert running.peak_tokens == sum(r.peak_tokens for r in running), (step, op)
    assert sorted(r.request_id for r in list(running) + pool) == sorted(r.request_id for r in reqs)


def test_a_disaggregated_engines_loads_stay_exact_through_pulls_preemption_and_aborts():
    """Decode pools small enough to preempt; every step, each decode instance's O(1) load is the
    sum over its running requests."""
    from dsjax.engine.scheduler import SchedulerConfig
    from tests.support.emulated import fixed_step_disagg_engine

    engine = fixed_step_disagg_engine(SchedulerConfig(max_num_seqs=8, max_prefill_tokens=512), num_decode=2,
                                      step_ms=0.01, num_blocks=24)
    rng = random.Random(1)
    reqs = [req(i, rng.randint(20, 90), rng.randint(10, 60)) for i in range(24)]
    list(map(engine.add_request, reqs))
    for step in itertools.count(1):
        if not engine.has_unfinished():
            break
        engine.step()
        if step == 15:  # an abort removes a running request too
            engine.abort(next(r for d in engine.decode for r in d.running).request_id)
        assert [d.load() for d in engine.decode] == [sum(r.peak_tokens for r in d.running) for d in engine.decode]
    assert sum(r.lifecycle.num_preemptions for r in reqs) > 0, "the pools were meant to force preemption"
    assert all(d.load() == 0 for d in engine.decode)

