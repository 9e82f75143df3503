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
    rows = [{"diff_with_host_points": -3.5, "gap_beyond_jitter_points": 0.0, "rate_equivalent_gap_pct": -1.5,
             "arrival_replay_gap_points": -0.7},
            {"diff_with_host_points": 1.0, "gap_beyond_jitter_points": 2.5, "rate_equivalent_gap_pct": None},
            {"gap_beyond_jitter_points": 0.1, "rate_equivalent_gap_pct": 0.8}]
    assert extras_summary(rows) == {"max_gap_with_host_points": 3.5, "max_gap_beyond_jitter_points": 2.5,
                                    "max_rate_equivalent_gap_pct": 1.5, "max_arrival_replay_gap_points": 0.7}
    assert extras_summary([]) == {"max_gap_with_host_points": None, "max_gap_beyond_jitter_points": None,
                                  "max_rate_equivalent_gap_pct": None, "max_arrival_replay_gap_points": None}


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


def test_arrival_replay_compares_the_router_side_with_a_replay_of_its_arrivals():
    """The simulator is asked for the router's arrival times (unsent requests at their schedule);
    the measured side takes TTFT from the router's arrival; the settling requests are load only."""
    import dataclasses
    import types

    import numpy as np

    from dsjax.bench.analysis import SLOs
    from dsjax.bench.emufidelity import arrival_replay
    from dsjax.bench.metrics import RequestRecord
    from dsjax.bench.records import LoadRun, RequestResult

    scheduled = [0.0, 1.0, 2.0, 3.0, 4.0]
    arrived = [0.002, 1.003, None, 3.001, 4.010]  # the third never reached the router
    server_ttft = [0.05, 0.05, None, 0.09, 0.05]  # the fourth misses a 0.08-s TTFT at the router
    results = []
    for i, (s, a, t) in enumerate(zip(scheduled, arrived, server_ttft)):
        err = "not sent: run stopped early" if a is None else None
        record = RequestRecord(send_s=s, token_times_s=() if a is None else (s + 0.1, s + 0.2), prompt_len=8,
                               output_len=2, error=err)
        results.append(RequestResult(index=i, request_id=str(i), scheduled_s=s, record=record, breakdown=None,
                                     server_ttft_s=t, finish_reason="length", server_arrival_s=a))
    run = LoadRun(rate=1.0, results=tuple(results), wall_s=5.0, stopped_early=False, send_lag_p99_s=0.0,
                  send_lag_max_s=0.0, measured_from=1)
    asked = []

    @dataclasses.dataclass
    class Result:  # the two arrays arrival_replay slices, and the attainment of what is left
        ttft_s: np.ndarray
        tpot_s: np.ndarray

        @property
        def attainment(self):
            return float(np.mean((self.ttft_s <= 0.08) & (self.tpot_s <= 0.15)))

    def result_at(requests, arrivals):  # request 4 (index) misses in the replay
        asked.append(list(arrivals))
        return Result(np.array([0.05, 0.05, 0.05, 0.05, 0.2]), np.full(5, 0.05))

    sim = types.SimpleNamespace(result_at=result_at, slos=SLOs(ttft_s=0.08, tpot_s=0.15))
    out = arrival_replay(run, sim, ["r"] * 5, scheduled)
    assert asked == [[0.002, 1.003, 2.0, 3.001, 4.010]]
    assert out["router_side_attainment"] == pytest.approx(0.5)  # of 1..4: 1 and 4 pass; 2 unsent, 3 too slow
    assert out["simulated_at_arrivals"] == pytest.approx(0.75)  # of 1..4 simulated: only 4 misses
    assert out["arrival_replay_gap_points"] == pytest.approx(-25.0)
    assert out["arrival_lag_ms"] == pytest.approx([2.5, 7.9, 10.0], abs=1e-6)
    assert arrival_replay(dataclasses.replace(run, results=tuple(dataclasses.replace(r, server_arrival_s=None)
                                                                  for r in results)), sim, ["r"] * 5, scheduled) == {}
