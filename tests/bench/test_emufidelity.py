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
    rows = [{"diff_with_host_points": -3.5, "gap_beyond_jitter_points": 0.0, "rate_equivalent_gap_pct": -1.5},
            {"diff_with_host_points": 1.0, "gap_beyond_jitter_points": 2.5, "rate_equivalent_gap_pct": None},
            {"gap_beyond_jitter_points": 0.1, "rate_equivalent_gap_pct": 0.8}]
    assert extras_summary(rows) == {"max_gap_with_host_points": 3.5, "max_gap_beyond_jitter_points": 2.5,
                                    "max_rate_equivalent_gap_pct": 1.5}
    assert extras_summary([]) == {"max_gap_with_host_points": None, "max_gap_beyond_jitter_points": None,
                                  "max_rate_equivalent_gap_pct": None}


def test_rate_equivalent_reads_a_gap_on_the_rate_axis():
    """A cliff: the simulator's attainment falls from 1 to 0 between 1.00x and 1.10x the rate.
    A run that measured 0.5 did what the simulator does at 1.05x (+5%)."""
    from dsjax.bench.emufidelity import rate_equivalent

    cliff = lambda f: min(1.0, max(0.0, (1.10 - f) / 0.10))  # noqa: E731
    assert rate_equivalent(0.5, cliff, steps=20) == pytest.approx(1.05, abs=1e-4)
    assert rate_equivalent(1.0, lambda f: 1.0) == 1.0  # agreement
    # the run did better than the simulator: it behaved as the simulator at a lower rate
    shifted = lambda f: min(1.0, max(0.0, (1.02 - f) / 0.10))  # noqa: E731
    assert rate_equivalent(0.5, shifted, steps=20) == pytest.approx(0.97, abs=1e-4)
    # out of the +-25% span: no answer rather than a clipped one
    assert rate_equivalent(0.0, lambda f: 1.0) is None
    assert rate_equivalent(1.0, lambda f: 0.0) is None
