import pytest

from dsjax.engine.policies import (
    chunked_prefill_plan,
    colocated_runs_prefill,
    decode_should_pull,
    least_loaded,
    prefill_batch_count,
)


def test_prefill_batching_fcfs_up_to_budget():
    assert prefill_batch_count([100, 200, 300, 50], token_budget=512, max_batch_size=8, free_kv_tokens=1e9) == 2
    assert prefill_batch_count([900, 10], token_budget=512, max_batch_size=8, free_kv_tokens=1e9) == 1  # long alone
    assert prefill_batch_count([10] * 10, token_budget=512, max_batch_size=4, free_kv_tokens=1e9) == 4
    assert prefill_batch_count([100, 100], token_budget=512, max_batch_size=8, free_kv_tokens=150) == 1
    assert prefill_batch_count([100], token_budget=512, max_batch_size=8, free_kv_tokens=50) == 0  # waits for memory
    assert prefill_batch_count([100, 100], token_budget=512, max_batch_size=8, free_kv_tokens=300, kv_tokens=[150, 200]) == 1
    assert prefill_batch_count([], token_budget=512, max_batch_size=8, free_kv_tokens=1e9) == 0


def test_decode_pull_rule():
    kw = dict(capacity_tokens=1000, waiting_fraction=0.05)
    assert decode_should_pull(need_tokens=100, free_tokens=100, waiting_tokens=0, **kw)
    assert not decode_should_pull(need_tokens=101, free_tokens=100, waiting_tokens=0, **kw)
    assert decode_should_pull(need_tokens=10, free_tokens=500, waiting_tokens=49, **kw)
    assert not decode_should_pull(need_tokens=10, free_tokens=500, waiting_tokens=50, **kw)


def test_chunked_plan_decodes_first():
    assert chunked_prefill_plan(num_decodes=12, remaining_prompt=[1000, 300], token_budget=512) == [500]
    assert chunked_prefill_plan(num_decodes=2, remaining_prompt=[100, 300, 50], token_budget=512) == [100, 300, 50]
    assert chunked_prefill_plan(num_decodes=2, remaining_prompt=[100, 500], token_budget=512) == [100, 410]
    assert chunked_prefill_plan(num_decodes=600, remaining_prompt=[100], token_budget=512) == []


def test_dispatch():
    assert least_loaded([3, 1, 1, 2]) == 1
    with pytest.raises(ValueError):
        least_loaded([])
    # the disaggregated engine breaks ties on queued tokens by queue length
    assert least_loaded([(10, 3), (10, 1), (12, 0)]) == 1
    assert colocated_runs_prefill(num_waiting=1, head_need_tokens=10, free_tokens=10)
    assert not colocated_runs_prefill(num_waiting=0, head_need_tokens=10, free_tokens=10)
    assert not colocated_runs_prefill(num_waiting=2, head_need_tokens=11, free_tokens=10)
