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
