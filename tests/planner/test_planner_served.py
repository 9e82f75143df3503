"""Fitting a latency profile on served step records (dsjax/planner/served.py): known coefficients
come back from noisy records with compile-stall outliers; too little data is a clear error."""

import numpy as np
import pytest

from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.latency import LatencyCoeffs, LatencyModel, Profile
from dsjax.planner.served import fit_served, served_profile, served_samples

TRUE = LatencyCoeffs(prefill=(3.0, 0.05, 2e-4), decode_small=(2.5, 0.002, 0.08), decode_large=(2.5, 0.002, 0.08))
BUCKETS = ShapeBuckets(block_size=16, attention="padded")


def _records(seed=0, outliers=True):
    rng = np.random.default_rng(seed)
    lat = LatencyModel(coeffs=TRUE, buckets=BUCKETS)
    recs = []
    for _ in range(600):
        if rng.random() < 0.3:
            lens = [int(x) for x in rng.integers(8, 400, rng.integers(1, 4))]
            ms = lat.prefill_ms(sum(lens), sum(x * x for x in lens), len(lens), max(lens))
            call = {"kind": "prefill", "chunks": [[0, n] for n in lens]}
        else:
            ctx = [int(x) for x in rng.integers(10, 600, rng.integers(1, 30))]
            ms = lat.decode_step_s(len(ctx), sum(c + 1 for c in ctx), max(ctx) + 1) * 1e3
            call = {"kind": "decode", "ctx": ctx}
        ms *= float(rng.normal(1.0, 0.03))
        if rng.random() < 0.03 and outliers:
            ms += 2000.0  # a first compilation inside the step
        recs.append({"t": 0.0, "ms": ms, "calls": [call]})
    # steps the fit must ignore: two calls, and a chunked mixed step
    recs.append({"t": 0.0, "ms": 50.0, "calls": [{"kind": "decode", "ctx": [5]}, {"kind": "decode", "ctx": [6]}]})
    recs.append({"t": 0.0, "ms": 90.0, "calls": [{"kind": "prefill", "chunks": [[9, 10], [0, 64]]}]})
    return recs


def test_samples_by_kind():
    s = served_samples(_records())
    assert s.multi == 1 and s.mixed == 1
    assert len(s.prefill) + len(s.decode) == 600


def test_fit_recovers_served_costs_despite_outliers():
    fit = fit_served(_records(), buckets=BUCKETS)
    lat, true = LatencyModel(coeffs=fit.coeffs, buckets=BUCKETS), LatencyModel(coeffs=TRUE, buckets=BUCKETS)
    for lens in ([16], [128], [256, 100], [300, 200, 50]):
        args = (sum(lens), sum(x * x for x in lens), len(lens), max(lens))
        assert lat.prefill_ms(*args) == pytest.approx(true.prefill_ms(*args), rel=0.08)
    for b, ctx in ((1, 100), (8, 300), (24, 500)):
        got = lat.decode_step_s(b, b * (ctx + 1), ctx + 1)
        assert got == pytest.approx(true.decode_step_s(b, b * (ctx + 1), ctx + 1), rel=0.08)
    assert fit.decode_median_rel_err < 0.05 and fit.prefill_median_rel_err < 0.05


def test_compile_stalls_leave_the_fit_where_clean_records_put_it():
    """Same records, 3% of them with a 2 s stall added: the same predictions."""
    clean = LatencyModel(coeffs=fit_served(_records(outliers=False), buckets=BUCKETS).coeffs, buckets=BUCKETS)
    robust = LatencyModel(coeffs=fit_served(_records(outliers=True), buckets=BUCKETS).coeffs, buckets=BUCKETS)
    for n in (16, 100, 256, 400):
        assert robust.prefill_ms(n, n * n) == pytest.approx(clean.prefill_ms(n, n * n), rel=0.05)
    for b in (1, 8, 24):
        assert robust.decode_step_s(b, b * 301, 301) == pytest.approx(clean.decode_step_s(b, b * 301, 301), rel=0.05)


def test_too_few_shapes_is_a_clear_error():
    recs = [{"t": 0.0, "ms": 3.0, "calls": [{"kind": "decode", "ctx": [10]}]}] * 10
    with pytest.raises(ValueError, match="prefill and .* decode shapes"):
        fit_served(recs, buckets=BUCKETS)
    with pytest.raises(ValueError, match="min_group"):
        fit_served(recs, buckets=BUCKETS, min_group=0)


def test_served_profile_replaces_one_entry():
    other = LatencyCoeffs(prefill=(1, 1, 0), decode_small=(1, 1, 1), decode_large=(1, 1, 1))
    base = Profile(entries={"small-llama": {1: other, 2: other}}, metadata={"shape_buckets": BUCKETS.to_json()}, source="p.json")
    fit = fit_served(_records(), buckets=BUCKETS)
    prof = served_profile(base, "small-llama", 1, fit, logs=["x.jsonl"])
    assert prof.coeffs("small-llama", 1) == fit.coeffs and prof.coeffs("small-llama", 2) == other
    assert prof.buckets == BUCKETS and prof.metadata["base_profile"] == "p.json"
    assert prof.metadata["served_fit"]["decode_shapes"] == fit.decode_groups


def test_best_fit_picks_the_features_the_steps_follow():
    from dsjax.planner.served import fit_served_best

    rng = np.random.default_rng(1)
    dense = LatencyModel(coeffs=TRUE, buckets=ShapeBuckets(block_size=16, attention="dense"))
    recs = []
    for _ in range(400):
        lens = [int(x) for x in rng.integers(8, 120, rng.integers(1, 9))]
        ms = dense.prefill_ms(sum(lens), sum(x * x for x in lens), len(lens), max(lens))
        recs.append({"t": 0.0, "ms": ms, "calls": [{"kind": "prefill", "chunks": [[0, n] for n in lens]}]})
        ctx = [int(x) for x in rng.integers(10, 600, rng.integers(1, 30))]
        ms = dense.decode_step_s(len(ctx), sum(c + 1 for c in ctx), max(ctx) + 1) * 1e3
        recs.append({"t": 0.0, "ms": ms, "calls": [{"kind": "decode", "ctx": ctx}]})
    fit, buckets = fit_served_best(recs, block_size=16)
    assert buckets.attention == "dense" and fit.prefill_median_rel_err < 0.01


def test_too_few_shapes_of_a_kind_scale_the_base_form():
    """One prefill shape only (every prompt alone at T_pad 512): with the runner profile as base,
    prefill keeps its form, scaled by served / base; decode is still fitted."""
    base = LatencyCoeffs(prefill=(1.0, 0.02, 1e-4), decode_small=(0.5, 0.001, 0.03), decode_large=(0.5, 0.001, 0.03))
    recs = [r for r in _records() if r["calls"][0]["kind"] == "decode"]
    lat_base = LatencyModel(coeffs=base, buckets=BUCKETS)
    for n in (400, 450, 500):  # one padded shape: T_pad 512
        ms = 1.5 * lat_base.prefill_ms(n, n * n, 1, n)
        recs += [{"t": 0.0, "ms": ms, "calls": [{"kind": "prefill", "chunks": [[0, n]]}]}] * 2
    with pytest.raises(ValueError, match="base profile to scale"):
        fit_served(recs, buckets=BUCKETS)
    fit = fit_served(recs, buckets=BUCKETS, base=base)
    assert fit.scaled == ("prefill",)
    assert fit.coeffs.prefill == pytest.approx(tuple(1.5 * x for x in base.prefill), rel=1e-6)
    true = LatencyModel(coeffs=TRUE, buckets=BUCKETS)
    assert LatencyModel(coeffs=fit.coeffs, buckets=BUCKETS).decode_step_s(8, 8 * 301, 301) == pytest.approx(
        true.decode_step_s(8, 8 * 301, 301), rel=0.08)


def _slowed(records, prefill_factor, decode_factor):
    out = []
    for r in records:
        f = decode_factor if r["calls"][0]["kind"] == "decode" else prefill_factor
        out.append(dict(r, ms=r["ms"] * f))
    return out


def test_speed_factors_measure_a_uniformly_slower_machine():
    """Records of the true costs with prefill 1.3x and decode 0.8x slower: the factors come back
    (stalls dropped), and the scaled coefficients then predict the slowed steps."""
    from dsjax.planner.served import scale_coeffs, speed_factors

    recs = _slowed(_records(seed=3), 1.3, 0.8)
    f = speed_factors(recs, TRUE, buckets=BUCKETS)
    assert f.prefill == pytest.approx(1.3, rel=0.02) and f.decode == pytest.approx(0.8, rel=0.02)
    assert f.prefill_steps > 100 and f.decode_steps > 300  # the 2 s stalls are not among them
    lat = LatencyModel(coeffs=scale_coeffs(TRUE, f), buckets=BUCKETS)
    base = LatencyModel(coeffs=TRUE, buckets=BUCKETS)
    assert lat.decode_step_s(8, 8 * 301, 301) == pytest.approx(0.8 * base.decode_step_s(8, 8 * 301, 301), rel=0.02)
    assert lat.prefill_ms(256, 256 ** 2) == pytest.approx(1.3 * base.prefill_ms(256, 256 ** 2), rel=0.02)


def test_speed_factors_fall_back_when_a_kind_has_too_few_steps():
    from dsjax.planner.served import speed_factors

    decode_only = [r for r in _slowed(_records(seed=4, outliers=False), 1.0, 1.5) if r["calls"][0]["kind"] == "decode"]
    f = speed_factors(decode_only, TRUE, buckets=BUCKETS)
    assert f.decode == pytest.approx(1.5, rel=0.02) and f.prefill == f.decode and f.prefill_steps == 0
    assert speed_factors([], TRUE, buckets=BUCKETS).decode == 1.0


def test_measured_shape_tables_take_precedence_over_the_form():
    """A shape served often keeps its own mean (here 40% above the form: a shape-specific cost
    the 3-term form cannot express); rarer shapes follow the form; tables survive JSON."""
    from dsjax.planner.latency import LatencyCoeffs

    recs = _records(seed=5, outliers=False)
    odd = [2, 3]  # batch bucket 2, S_pad 16: made 40% slower
    lat_true = LatencyModel(coeffs=TRUE, buckets=BUCKETS)
    true_odd = lat_true.decode_step_s(2, 7, 4) * 1e3
    recs += [{"t": 0.0, "ms": 1.4 * true_odd, "calls": [{"kind": "decode", "ctx": odd}]} for _ in range(30)]
    fit = fit_served(recs, buckets=BUCKETS)
    lat = LatencyModel(coeffs=fit.coeffs, buckets=BUCKETS)
    assert lat.decode_step_s(2, 7, 4) * 1e3 == pytest.approx(1.4 * true_odd, rel=0.03)  # (a few true records share it)
    form_only = LatencyModel(coeffs=fit.coeffs.without_tables(), buckets=BUCKETS)
    assert form_only.decode_step_s(2, 7, 4) * 1e3 < 1.25 * true_odd
    assert fit.coeffs.decode_table and fit.coeffs.prefill_table
    back = LatencyCoeffs.from_json(fit.coeffs.to_json())
    assert back == fit.coeffs
    assert fit_served(recs, buckets=BUCKETS, table_min_records=None).coeffs.decode_table == ()
    with pytest.raises(ValueError, match="decode_table"):
        LatencyCoeffs(prefill=(1, 0, 0), decode_small=(1, 0, 0), decode_large=(1, 0, 0), decode_table=((2, 32, 0.0),))


def _decode_run(join_ms, seed=0):
    """One decode loop's consecutive steps: requests join (landing costs `join_ms`, charged to the
    step before they appear) and leave; step time from TRUE."""
    rng = np.random.default_rng(seed)
    lat = LatencyModel(coeffs=TRUE, buckets=BUCKETS)
    running, recs, t = [int(x) for x in rng.integers(20, 300, 3)], [], 0.0
    for _ in range(3000):
        ms = lat.decode_step_s(len(running), sum(c + 1 for c in running), max(running) + 1) * 1e3
        joins = int(rng.random() < 0.1)
        ms += joins * join_ms
        recs.append({"t": t, "ms": ms * float(rng.normal(1.0, 0.02)), "calls": [{"kind": "decode", "ctx": list(running)}]})
        t += ms * 1e-3
        running = [c + 1 for c in running if rng.random() > 0.02 or len(running) == 1]
        running += [int(x) for x in rng.integers(20, 300, joins)]
        running = running[:30]
    return recs


def test_join_cost_is_fitted_apart_from_the_steps():
    from dsjax.planner.served import served_samples

    recs = _decode_run(join_ms=5.0) + [r for r in _records(seed=6, outliers=False) if r["calls"][0]["kind"] == "prefill"]
    s = served_samples(recs, split_joins=True)
    assert 200 < len(s.decode_joined) < 400 and all(j == 1 for _, _, j in s.decode_joined)
    fit = fit_served(recs, buckets=BUCKETS, split_joins=True)
    assert fit.decode_join_ms == pytest.approx(5.0, rel=0.1)
    lat, true = LatencyModel(coeffs=fit.coeffs, buckets=BUCKETS), LatencyModel(coeffs=TRUE, buckets=BUCKETS)
    for b, ctx in ((2, 100), (8, 250), (16, 280)):
        assert lat.decode_step_s(b, b * (ctx + 1), ctx + 1) == pytest.approx(true.decode_step_s(b, b * (ctx + 1), ctx + 1), rel=0.05)
    # without the split the landings inflate the steps instead
    assert fit_served(recs, buckets=BUCKETS).decode_join_ms == 0.0
