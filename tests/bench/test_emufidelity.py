"""The emulated compare's two readings of a gap (dsjax/bench/emufidelity.py), on small numbers."""

import pytest

from dsjax.bench.emufidelity import extras_summary, front_end_s, mean_host_s


def test_mean_host_time_per_step_and_per_prompt_batch():
    c = {"continued_steps": 400.0, "host_gap_seconds": 0.6, "prefill_launches": 50.0, "prefill_host_gap_seconds": 0.05}
    assert mean_host_s(c) == pytest.approx(0.0015)
    assert mean_host_s(c, "prefill_host_gap_seconds", "prefill_launches") == pytest.approx(0.001)
    assert mean_host_s(None) is None and mean_host_s({"continued_steps": 0.0, "host_gap_seconds": 0.0}) is None


def test_front_end_hop_is_the_median_router_and_client_parts():
    assert front_end_s({"ttft_router_minus_engine_ms": [0.5, 0.9], "ttft_client_minus_router_ms": [1.5, 4.0]}) == pytest.approx(0.002)
    assert front_end_s({"ttft_router_minus_engine_ms": None}) == 0.0


def test_summary_takes_the_largest_gap_of_each_reading():
    rows = [{"diff_with_host_points": -3.5, "gap_beyond_jitter_points": 0.0},
            {"diff_with_host_points": 1.0, "gap_beyond_jitter_points": 2.5}, {"gap_beyond_jitter_points": 0.1}]
    assert extras_summary(rows) == {"max_gap_with_host_points": 3.5, "max_gap_beyond_jitter_points": 2.5}
    assert extras_summary([]) == {"max_gap_with_host_points": None, "max_gap_beyond_jitter_points": None}
