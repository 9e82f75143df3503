"""Schedulers, block manager and placement: plain Python, tested without any device code."""

import subprocess
import sys
from collections import deque

import pytest

from dsjax.engine.block_manager import BlockManager
from dsjax.engine.placement import PhaseParallel, Placement, load_plan, save_plan
from dsjax.engine.request import Request, Status
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig, pick_decode_batch, pick_prefill_batch


def test_device_free_modules_do_not_import_jax():
    code = (
        "import sys; import dsjax.engine.scheduler, dsjax.engine.block_manager, dsjax.engine.placement, dsjax.engine.request, dsjax.planner, dsjax.workloads;"
        "bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def req(i, n, out=0):
    r = Request(request_id=f"r{i}", prompt_token_ids=[1] * n, sampling=SamplingParams(max_tokens=100), seed=0)
    r.output_token_ids = [2] * out
    return r


def test_prefill_fcfs_token_budget_and_long_prompt_alone():
    cfg = SchedulerConfig(max_prefill_tokens=100, max_prefill_seqs=8)
    bm = BlockManager(num_blocks=100, block_size=4)
    waiting = deque([req(0, 30), req(1, 30), req(2, 30), req(3, 30), req(4, 200), req(5, 10)])
    assert [r.request_id for r in pick_prefill_batch(waiting, bm, cfg)] == ["r0", "r1", "r2"]
    assert [r.request_id for r in pick_prefill_batch(waiting, bm, cfg)] == ["r3"]  # 30 + 200 > budget
    assert [r.request_id for r in pick_prefill_batch(waiting, bm, cfg)] == ["r4"]  # alone, over budget
    assert bm.block_table("r4") and len(bm.block_table("r4")) == 50


def test_prefill_head_of_line_waits_for_memory():
    cfg = SchedulerConfig(max_prefill_tokens=1000)
    bm = BlockManager(num_blocks=5, block_size=4)  # 16 tokens of room
    waiting = deque([req(0, 20), req(1, 4)])
    assert pick_prefill_batch(waiting, bm, cfg) == []  # the small one does not overtake the head
    assert len(waiting) == 2 and bm.num_free_blocks == 4


def test_prefill_respects_seq_limits():
    bm = BlockManager(num_blocks=100, block_size=4)
    waiting = deque(req(i, 2) for i in range(10))
    assert len(pick_prefill_batch(waiting, bm, SchedulerConfig(max_prefill_seqs=3))) == 3
    assert len(pick_prefill_batch(waiting, bm, SchedulerConfig(), max_seqs=2)) == 2


def test_decode_grows_and_preempts_newest():
    cfg = SchedulerConfig(max_num_seqs=8)
    bm = BlockManager(num_blocks=4, block_size=4)  # 3 usable blocks
    running = [req(i, 3, out=1) for i in range(3)]  # 4 tokens each: exactly one block each
    for r in running:
        bm.allocate(r.request_id, 3)
        r.status = Status.RUNNING
    batch, preempted = pick_decode_batch(running, bm, cfg)
    assert [r.request_id for r in batch] == ["r0", "r1", "r2"] and not preempted
    for r in running:
        r.output_token_ids.append(2)  # now 5 tokens: each needs a second block
    batch, preempted = pick_decode_batch(running, bm, cfg)
    assert [r.request_id for r in preempted] == ["r2", "r1"]
    assert [r.request_id for r in batch] == ["r0"] and len(bm.block_table("r0")) == 2
    assert all(r.status is Status.WAITING and r.lifecycle.num_preemptions == 1 for r in preempted)
    bm.check_invariants()


def test_decode_ahead_writes_one_further_and_skips_requests_ending_in_flight():
    """An overlapped step: requests of the step in flight hold one token more than their records
    show, and one whose in-flight token is its last by length sits the step out."""
    def setup():
        bm = BlockManager(num_blocks=8, block_size=4)
        a, ending, c = req(0, 3, out=1), req(1, 3, out=1), req(2, 2, out=1)
        ending.sampling = SamplingParams(max_tokens=2)  # its in-flight token is its second and last
        for r in (a, ending, c):
            bm.allocate(r.request_id, r.num_tokens - 1)
            r.status = Status.RUNNING
        return bm, [a, ending, c]

    cfg = SchedulerConfig(max_num_seqs=2)
    bm, running = setup()
    a, ending, c = running
    batch, preempted = pick_decode_batch(running, bm, cfg, ahead=frozenset({id(a), id(ending)}))
    assert batch == [a, c] and not preempted  # `c` takes the seat `ending` leaves
    assert bm.num_tokens("r0") == 5 and len(bm.block_table("r0")) == 2  # a: 4 recorded + 1 in flight
    assert bm.num_tokens("r2") == 3  # c: not ahead, writes its recorded last position
    bm.check_invariants()
    bm, running = setup()
    batch, _ = pick_decode_batch(running, bm, cfg)
    assert batch == running[:2]  # with no step in flight, `ending` still has a token to make
    assert bm.num_tokens("r0") == 4 and len(bm.block_table("r0")) == 1


def test_placement_validation_and_plan_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="tp=0"):
        PhaseParallel(tp=0)
    with pytest.raises(ValueError, match="overlap"):
        Placement(prefill=PhaseParallel(devices=((0,),)), decode=PhaseParallel(devices=((0,),)))
    with pytest.raises(ValueError, match="mode"):
        Placement(mode="both")
    with pytest.raises(ValueError, match="replicas=2"):
        PhaseParallel(replicas=2, devices=((0,),))
    p = Placement(prefill=PhaseParallel(tp=2, replicas=2), decode=PhaseParallel(tp=1, pp=2))
    assert p.num_devices == 6
    save_plan(tmp_path / "plan.json", p, goodput=1.5)
    back, meta = load_plan(tmp_path / "plan.json")
    assert back == p and meta == {"goodput": 1.5}
    with pytest.raises(ValueError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
