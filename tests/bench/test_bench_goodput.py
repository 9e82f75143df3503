"""Goodput and the tightest SLO scale measured over gRPC against a FIFO fake with a known answer."""

import pytest

from dsjax.bench.analysis import SLOs, run_row, search_goodput, slo_scale_curve
from dsjax.bench.loadgen import run_load, send_schedule
from dsjax.bench.metrics import attainment, goodput, tightest_slo_scale
from dsjax.bench.records import BenchRequest
from dsjax.bench.sweep import SweepConfig, sweep_target
from tests.support.fake_server import FakeServer, FakeTiming

N = 30
TIMING = FakeTiming(prefill_fixed_s=0.020, tpot_s=0.005)  # one FIFO server: capacity 50 req/s
SLO = SLOs(ttft_s=0.080, tpot_s=0.050)
RATES = (10.0, 20.0, 40.0, 80.0)


def _requests():
    return [BenchRequest(index=i, prompt_len=8, output_len=3, prompt_token_ids=(1,) * 8) for i in range(N)]


def test_goodput_by_scan_and_bisection_matches_the_known_answer():
    # Twice as fast a server as TIMING (service 10 ms: capacity 100 req/s) at twice the rates.
    timing = FakeTiming(prefill_fixed_s=0.010, tpot_s=0.005)
    slo = SLOs(ttft_s=0.040, tpot_s=0.050)
    rates = tuple(2 * r for r in RATES)

    def oracle(rate):
        offsets = send_schedule(N, rate=rate, seed=0)
        return attainment(timing.expected(offsets, [(8, 3)] * N), slo.ttft_s, slo.tpot_s).joint

    want = goodput(oracle, list(rates), rel_tol=0.05, max_bisections=4)
    assert rates[0] < want.rate < rates[-1]  # the known answer lies inside the scan
    reqs = _requests()
    with FakeServer(timing) as server:
        search = search_goodput(
            lambda rate, early: run_load(server.target, reqs, send_schedule(N, rate=rate, seed=0), rate=rate, progress=False),
            rates, slo, rel_tol=0.05, max_bisections=4,
        )
    assert search.rate == pytest.approx(want.rate, rel=0.2), (search.result.probes, want.probes)
    assert not search.result.saturated
    assert [r for r, _ in search.result.probes][:2] == list(rates[:2])


def test_sweep_rows_tightest_scale_and_slo_curve():
    reqs = _requests()
    cfg = SweepConfig(rates=(10.0, 200.0), max_bisections=2, rel_tol=0.3, seed=0)
    with FakeServer(TIMING) as server:
        sweep = sweep_target(server.target, reqs, cfg, SLO, label="fake", progress=False, log=lambda _: None)
    rates = [row["rate"] for row in sweep.rows]
    assert rates == sorted(rates) and 10.0 in rates and 200.0 in rates
    low = sweep.rows[0]
    assert low["attainment_joint"] >= 0.9 and low["num_failed"] == 0 and low["system"] == "fake"
    # Known answer at a low rate: every TTFT ~ 20 ms, TPOT ~ 5 ms, so the tightest scale is
    # max(20/80, 5/50) = 0.25, plus client overhead.
    assert 0.25 - 1e-3 <= low["tightest_slo_scale"] <= 0.6
    assert low["mean_prefill_s"] == pytest.approx(0.020, abs=1e-6) and low["mean_queue_s"] < 0.005
    high = next(row for row in sweep.rows if row["rate"] == 200.0)
    assert not high["stopped_early"]  # scan rates always run in full
    assert high["attainment_joint"] < 0.9 and high["tightest_slo_scale"] > 1.0
    assert 10.0 <= sweep.goodput < 200.0
    curve = slo_scale_curve(sweep.run_at(10.0).records, SLO, scales=(0.1, 0.5, 1.0, 4.0))
    assert [a for _, a in curve][-2:] == [1.0, 1.0] and curve[0][1] < 0.5
    run = sweep.run_at(200.0)
    assert run_row(run, SLO)["tightest_slo_scale"] == tightest_slo_scale(run.records, SLO.ttft_s, SLO.tpot_s)


def test_speed_probes_run_just_before_each_measured_run():
    """With probe_s, each measured run is preceded by an unmeasured probe at its rate; the probe's
    wall-clock window ends before the run starts (and the rows are those of the measured runs)."""
    reqs = _requests()
    cfg = SweepConfig(rates=(10.0, 200.0), bisect=False, seed=0, probe_s=0.5)
    with FakeServer(TIMING) as server:
        sweep = sweep_target(server.target, reqs, cfg, SLO, label="fake", progress=False, log=lambda _: None)
    assert set(sweep.probe_windows) == {10.0, 200.0}
    for run in sweep.runs:
        start, end = sweep.probe_windows[run.rate]
        assert start < end <= run.started_at < start + 60
        assert len(run.results) == len(reqs)
    with pytest.raises(ValueError, match="probe_s"):
        SweepConfig(rates=(1.0,), probe_s=-1)
