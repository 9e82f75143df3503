"""The load generator against a scripted gRPC server: measured TTFT/TPOT/ITL, the LatencyBreakdown,
the send schedule, early stop and client-side load balancing."""

import math

import numpy as np
import pytest

from dsjax.bench.loadgen import StopRule, run_load, send_schedule
from dsjax.bench.metrics import attainment, inter_token_latencies_s, tpot_s, ttft_s
from dsjax.bench.records import BenchRequest
from tests.support.fake_server import FakeServer, FakeTiming


def _requests(n, prompt_len=12, output_len=5):
    return [BenchRequest(index=i, prompt_len=prompt_len, output_len=output_len, prompt_token_ids=tuple(range(prompt_len)))
            for i in range(n)]


def test_measured_ttft_tpot_itl_and_breakdown_match_the_script():
    timing = FakeTiming(prefill_fixed_s=0.040, prefill_s_per_token=0.0005, tpot_s=0.010)
    reqs = _requests(6, prompt_len=20, output_len=6)
    offsets = [0.1 * i for i in range(6)]  # 100 ms apart: no queueing (service 50 ms)
    with FakeServer(timing) as server:
        run = run_load(server.target, reqs, offsets, rate=10.0, progress=False, tag="t")
    assert not run.stopped_early and all(r.record.error is None for r in run.results)
    ttfts = [ttft_s(r.record) for r in run.results]
    tpots = [tpot_s(r.record) for r in run.results]
    # Known answer: TTFT = 40 + 0.5 * 20 = 50 ms, TPOT = 10 ms (client overhead only adds a little).
    assert all(0.050 - 1e-3 <= t <= 0.050 + 0.040 for t in ttfts), ttfts
    assert abs(np.mean(ttfts) - 0.050) < 0.015
    assert all(abs(t - 0.010) < 0.004 for t in tpots), tpots
    gaps = [g for r in run.results for g in inter_token_latencies_s(r.record)]
    assert len(gaps) == 6 * 5 and abs(np.median(gaps) - 0.010) < 0.003
    for r in run.results:
        assert r.record.num_tokens == 6 and r.finish_reason == "LENGTH"
        assert r.breakdown.queue_s == pytest.approx(0.0, abs=1e-6)
        assert r.breakdown.prefill_s == pytest.approx(0.050, abs=1e-6)
        assert r.breakdown.decode_s == pytest.approx(0.050, abs=1e-6)
        assert abs(r.server_ttft_s - 0.050) < 0.005
        assert r.to_json()["breakdown"]["prefill_s"] == pytest.approx(0.050, abs=1e-6)
    assert run.send_lag_max_s < 0.05


def test_poisson_schedule_statistics_and_rate_scaling():
    offsets = np.array(send_schedule(20000, rate=4.0, seed=3))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.25) < 0.25 * 0.03
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.03  # exponential gaps: CV 1
    # Memorylessness: P(gap > 2 / rate) = e^-2.
    assert abs(np.mean(gaps > 0.5) - math.exp(-2)) < 0.01
    # One seed, any rate: the same arrival pattern compressed.
    np.testing.assert_allclose(np.array(send_schedule(100, rate=8.0, seed=3)), offsets[:100] / 2, rtol=1e-9, atol=1e-12)
    bursty = np.diff(send_schedule(20000, rate=4.0, arrival="gamma", cv=3.0, seed=3))
    assert abs(bursty.mean() - 0.25) < 0.25 * 0.1 and abs(bursty.std() / bursty.mean() - 3.0) < 0.3


def test_requests_leave_on_schedule():
    offsets = send_schedule(40, rate=40.0, seed=1)
    with FakeServer(FakeTiming(prefill_fixed_s=0.001, tpot_s=0.001)) as server:
        run = run_load(server.target, _requests(40, output_len=2), offsets, rate=40.0, progress=False)
    lags = [r.record.send_s - r.scheduled_s for r in run.results]
    assert min(lags) >= -1e-4
    assert np.median(lags) < 0.005 and run.send_lag_p99_s < 0.05


def test_attainment_matches_the_fifo_queue_known_answer():
    timing = FakeTiming(prefill_fixed_s=0.020, tpot_s=0.002)
    reqs = _requests(40, output_len=4)
    lengths = [(r.prompt_len, r.output_len) for r in reqs]
    with FakeServer(timing) as server:
        for rate in (15.0, 45.0):
            offsets = send_schedule(40, rate=rate, seed=0)
            run = run_load(server.target, reqs, offsets, rate=rate, progress=False)
            # The known answer: the same FIFO queue replayed on the times the requests really left.
            expected = timing.expected([r.record.send_s for r in run.results], lengths)
            excess = np.array([ttft_s(r.record) - ttft_s(e) for r, e in zip(run.results, expected)])
            # The server's queue runs on virtual time, so delivery only adds milliseconds to a
            # request; it never serves one earlier than the queue allows.
            assert excess.min() > -0.002 and np.median(excess) < 0.010, (rate, excess)
            # So attainment is bracketed by the replay's at the SLO and at the SLO less the slack.
            # (At 45 req/s the TTFTs sit at the 70 ms SLO: 2 ms of delivery flip a quarter of them,
            # which is why the bracket and not equality is asserted there.)
            slack = min(float(np.percentile(excess, 95)) + 1e-4, 0.069)
            got = attainment(run.records, 0.070, 0.005).ttft
            assert attainment(expected, 0.070 - slack, 0.005).ttft - 0.05 <= got <= attainment(expected, 0.072, 0.005).ttft, (rate, got)
            if rate == 15.0:
                assert got == attainment(expected, 0.070, 0.005).ttft == 1.0
            assert attainment(run.records, 0.070, 0.005).tpot == 1.0  # 2 ms tokens against a 5 ms SLO


def test_early_stop_cancels_an_overloaded_run():
    timing = FakeTiming(prefill_fixed_s=0.030, tpot_s=0.001)
    reqs = _requests(60, output_len=2)
    offsets = send_schedule(60, rate=200.0, seed=0)  # 6.7x the capacity
    rule = StopRule(ttft_slo_s=0.050, tpot_slo_s=1.0)
    with FakeServer(timing) as server:
        run = run_load(server.target, reqs, offsets, rate=200.0, stop_rule=rule, progress=False)
    assert run.stopped_early
    assert attainment(run.records, 0.050, 1.0).joint < 0.9
    assert run.wall_s < 60 * 0.030  # sooner than serving them all
    assert any(r.record.error and "stopped early" in r.record.error for r in run.results)


def test_several_targets_share_the_load():
    timing = FakeTiming(prefill_fixed_s=0.010, tpot_s=0.002)
    with FakeServer(timing) as a, FakeServer(timing) as b:
        run = run_load([a.target, b.target], _requests(20, output_len=3), send_schedule(20, rate=100.0, seed=2),
                       rate=100.0, progress=False)
        assert a.servicer.num_requests + b.servicer.num_requests == 20
        assert min(a.servicer.num_requests, b.servicer.num_requests) >= 5
    assert all(r.record.ok for r in run.results)


def test_unreachable_target_is_an_error():
    with pytest.raises(ConnectionError, match="no gRPC server"):
        run_load("127.0.0.1:1", _requests(1), [0.0], rate=1.0, progress=False, connect_timeout_s=0.5)
