"""The served calibration's KV transfer fit (dsjax/bench/simcompare.py)."""

import pytest

from dsjax.bench.simcompare import fit_transfer


def test_fit_transfer_recovers_latency_and_bandwidth():
    samples = [(b, 0.004 + b / 50e6) for b in (1e5, 4e5, 9e5, 1.8e6)]
    fixed, bw = fit_transfer(samples)
    assert fixed == pytest.approx(0.004, rel=1e-6) and bw == pytest.approx(50e6, rel=1e-6)


def test_fit_transfer_degenerate_inputs():
    assert fit_transfer([]) == (0.0, None)
    assert fit_transfer([(1e6, 0.01), (1e6, 0.03)]) == (0.02, None)  # too few, no spread: the median
    fixed, bw = fit_transfer([(1e5, 0.03), (1e6, 0.02), (2e6, 0.01)])  # bytes do not explain it
    assert (fixed, bw) == (0.02, None)
    fixed, bw = fit_transfer([(1e6, 0.01), (2e6, 0.021), (3e6, 0.032)])  # negative intercept: through 0
    assert fixed == 0.0 and bw == pytest.approx(1e6 / 0.01, rel=0.1)


def test_speed_scaled_follows_the_window_and_slows_the_simulator(tmp_path):
    """Step records of one window run 2x the calibration's costs, another's at 1x: rescaling on
    each gives those factors, and the simulator fed the slow one predicts lower attainment."""
    import json

    from dsjax.bench.analysis import SLOs
    from dsjax.bench.records import BenchRequest
    from dsjax.bench.simcompare import ServedCalibration, TraceSimulator, speed_scaled, step_records
    from dsjax.planner.buckets import ShapeBuckets
    from dsjax.planner.latency import LatencyCoeffs, LatencyModel, Profile

    coeffs = LatencyCoeffs(prefill=(5.0, 0.08, 3e-4), decode_small=(2.3, 1e-3, 0.1), decode_large=(2.3, 1e-3, 0.1))
    buckets = ShapeBuckets(block_size=16, attention="padded")
    profile = Profile(entries={"small-llama": {1: coeffs}}, metadata={"shape_buckets": buckets.to_json()})
    lat = LatencyModel(coeffs=coeffs, buckets=buckets)
    lines = []
    for start, factor in ((1000.0, 2.0), (2000.0, 1.0)):
        for i in range(60):
            ctx = [100 + i] * (1 + i % 8)
            ms = lat.decode_step_s(len(ctx), sum(c + 1 for c in ctx), max(ctx) + 1) * 1e3 * factor
            lines.append({"t": start + i, "ms": ms, "calls": [{"kind": "decode", "ctx": ctx}]})
            n = 32 + 4 * i
            lines.append({"t": start + i + 0.5, "ms": lat.prefill_ms(n, n * n, 1, n) * factor,
                          "calls": [{"kind": "prefill", "chunks": [[0, n]]}]})
    (tmp_path / "engine-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cal = ServedCalibration(profile=profile, transfer_fixed_s=0.0, link_bytes_per_s=None, info={})
    records = step_records(tmp_path)
    slow, f_slow = speed_scaled(cal, records=records, window=(1000.0, 1100.0), model="small-llama")
    same, f_same = speed_scaled(cal, records=records, window=(2000.0, 2100.0), model="small-llama")
    assert f_slow.decode == pytest.approx(2.0) and f_slow.prefill == pytest.approx(2.0)
    assert f_same.decode == pytest.approx(1.0) and f_same.prefill == pytest.approx(1.0)
    assert slow.info["speed_factors"]["decode"] == pytest.approx(2.0)
    slos = SLOs(ttft_s=0.5, tpot_s=0.0045, target=0.9)  # 2.6-3.5 ms steps pass, 2x those fail
    reqs = [BenchRequest(index=i, prompt_len=64 + 7 * i, output_len=40, prompt_text="x") for i in range(40)]
    offsets = [0.4 * i for i in range(40)]
    kw = dict(system="colocated", model="small-llama", slos=slos, max_num_seqs=32, max_prefill_tokens=256)
    fast_att = TraceSimulator.calibrated(same, **kw).run(reqs, offsets).attainment
    slow_att = TraceSimulator.calibrated(slow, **kw).run(reqs, offsets).attainment
    assert fast_att >= 0.9 and slow_att <= 0.1


def test_result_at_pairs_each_request_with_its_own_arrival():
    """Arrival times out of order: request i arrives at arrivals[i] and the arrays come back in
    request order (result_all's come back in arrival order: the trace is sorted)."""
    import numpy as np

    from dsjax.bench.analysis import SLOs
    from dsjax.bench.records import BenchRequest
    from dsjax.bench.simcompare import TraceSimulator
    from dsjax.planner.latency import LatencyCoeffs, Profile

    coeffs = LatencyCoeffs(prefill=(5.0, 0.08, 3e-4), decode_small=(2.3, 1e-3, 0.1), decode_large=(2.3, 1e-3, 0.1))
    sim = TraceSimulator(system="colocated", profile=Profile(entries={"small-llama": {1: coeffs}}), model="small-llama",
                         slos=SLOs(ttft_s=0.5, tpot_s=0.01), max_num_seqs=8, max_prefill_tokens=512)
    # long prompts far apart, so each request's TTFT is its own prefill: it tells which prompt ran
    reqs = [BenchRequest(index=i, prompt_len=50 + 200 * i, output_len=4, prompt_text="x") for i in range(3)]
    alone = sim.result_all(reqs, [0.0, 10.0, 20.0]).ttft_s
    assert alone[0] < alone[1] < alone[2]
    swapped = sim.result_at(reqs, [20.0, 10.0, 0.0])  # the same requests, arriving the other way round
    np.testing.assert_allclose(swapped.ttft_s, alone, rtol=1e-9)
    np.testing.assert_allclose(sim.result_at(reqs, [0.0, 10.0, 20.0]).ttft_s, alone, rtol=1e-9)
    # result_all of the same: the same pairs, listed by arrival
    np.testing.assert_allclose(sim.result_all(reqs, [20.0, 10.0, 0.0]).ttft_s, alone[::-1], rtol=1e-9)
