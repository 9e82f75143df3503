import json

import numpy as np
import pytest

from dsjax.planner.fitting import fit_profile
from dsjax.planner.latency import LatencyCoeffs, LatencyModel, Profile, load_profile, profile_from_json, save_profile
from tests.support.planner_reference import distserve_profile

COEFFS = LatencyCoeffs(prefill=(18.0, 0.1, 7e-6), decode_small=(20.0, 6e-4, 0.04), decode_large=(7.0, 5.8e-4, 0.16))


def test_distserve_sanity_values():
    """facts file: OPT-13B TP1 512-token prefill ~ 72.2 ms, one decode step at 512 context ~ 20.3 ms."""
    profile = load_profile(distserve_profile())
    lat = profile.latency("opt-13b", tp=1)
    assert lat.prefill_s(512, 512 * 512) * 1e3 == pytest.approx(72.2, abs=0.1)
    assert lat.decode_step_s(1, 512 + 1) * 1e3 == pytest.approx(20.3, abs=0.1)
    assert profile.tp_degrees("facebook/opt-66b") == (2, 3, 4, 8)


def test_metadata_is_ignored_and_round_trips(tmp_path):
    doc = json.loads(distserve_profile().read_text())
    doc["metadata"] = {"device": "NVIDIA H100", "dtype": "bfloat16", "date": "2025-01-01"}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    profile = load_profile(path)
    assert "metadata" not in profile.entries and profile.metadata["dtype"] == "bfloat16"
    save_profile(tmp_path / "q.json", profile)
    again = load_profile(tmp_path / "q.json")
    assert again.coeffs("opt-13b", 2) == profile.coeffs("facebook/opt-13b", 2)
    assert again.metadata == profile.metadata


def test_name_mapping_and_errors():
    profile = Profile(entries={"facebook/opt-13b": {1: COEFFS}})
    assert profile.coeffs("opt-13b", 1) is COEFFS
    with pytest.raises(ValueError, match="no tp=4"):
        profile.coeffs("opt-13b", 4)
    with pytest.raises(ValueError, match="no model 'opt-66b'"):
        profile.coeffs("opt-66b", 1)
    with pytest.raises(ValueError, match="lacks"):
        profile_from_json({"m": {"1": {"prefill": [1, 2, 3]}}})
    with pytest.raises(ValueError, match="non-integer TP"):
        profile_from_json({"m": {"x": COEFFS.to_json()}})


def test_decode_threshold_switches_coefficients():
    assert COEFFS.decode_ms(94, 1000) == pytest.approx(20.0 + 0.6 + 0.04 * 94)
    assert COEFFS.decode_ms(95, 1000) == pytest.approx(7.0 + 0.58 + 0.16 * 95)


def test_pipeline_stage_formulas():
    lat = LatencyModel(coeffs=COEFFS, tp=1, pp=4, pp_overhead_ms=1.0)
    full = COEFFS.prefill_ms(1000, 1000**2)
    assert lat.prefill_stage_s(1000, 1000**2) == pytest.approx((full / 4 + 4) * 1e-3)
    assert lat.prefill_s(1000, 1000**2) == pytest.approx(4 * (full / 4 + 4) * 1e-3)
    # decode: micro-batches of ceil(B/pp); a request waits pp stages of decode(mb)/pp each.
    assert lat.decode_step_s(8, 8 * 100) == pytest.approx(COEFFS.decode_ms(2, 200) * 1e-3)
    one = LatencyModel(coeffs=COEFFS)
    assert one.prefill_stage_s(1000, 1000**2) == pytest.approx(full * 1e-3)
    alpha, beta = one.decode_linear_s(10, 5000)
    assert alpha == pytest.approx(COEFFS.decode_ms(10, 5000) * 1e-3)
    assert beta == pytest.approx((COEFFS.decode_ms(10, 5010) - COEFFS.decode_ms(10, 5000)) * 1e-3)


def test_saturating_prefill_tokens():
    lat = LatencyModel(coeffs=COEFFS)
    L = lat.saturating_prefill_tokens(0.9)
    a, b, _ = COEFFS.prefill
    assert L / (a + b * L) == pytest.approx(0.9 / b, rel=1e-3)


def test_fit_profile_recovers_coefficients():
    rng = np.random.default_rng(0)
    prefill = []
    for _ in range(40):
        lens = rng.integers(16, 2048, size=rng.integers(1, 5)).tolist()
        prefill.append((lens, COEFFS.prefill_ms(sum(lens), sum(x * x for x in lens))))
    decode = []
    for bs in list(range(1, 90, 4)) + list(range(100, 300, 10)):
        ctx = rng.integers(10, 2000, size=bs).tolist()
        decode.append((ctx, COEFFS.decode_ms(bs, sum(c + 1 for c in ctx))))
    fit = fit_profile(prefill=prefill, decode=decode)
    np.testing.assert_allclose(fit.prefill, COEFFS.prefill, rtol=1e-6)
    np.testing.assert_allclose(fit.decode_small, COEFFS.decode_small, rtol=1e-6)
    np.testing.assert_allclose(fit.decode_large, COEFFS.decode_large, rtol=1e-6)
    # With 5% multiplicative noise the relative-error fit stays close.
    noisy = [(l, ms * (1 + 0.05 * rng.standard_normal())) for l, ms in prefill]
    rough = fit_profile(prefill=noisy, decode=decode)
    assert rough.prefill_ms(512, 512**2) == pytest.approx(COEFFS.prefill_ms(512, 512**2), rel=0.05)


def test_fit_profile_errors_and_single_regime():
    with pytest.raises(ValueError, match="at least 3 prefill samples"):
        fit_profile(prefill=[([1], 1.0)], decode=[([1] * 2, 1.0)] * 3)
    small_only = [([100] * bs, COEFFS.decode_ms(bs, 101 * bs)) for bs in (1, 2, 4, 8)]
    prefill = [([n], COEFFS.prefill_ms(n, n * n)) for n in (100, 500, 1000, 2000)]
    fit = fit_profile(prefill=prefill, decode=small_only)
    assert fit.decode_large == fit.decode_small
    with pytest.raises(ValueError, match="> 0 ms"):
        fit_profile(prefill=[([1], 0.0)] * 3, decode=small_only)


def test_fit_keeps_coefficients_nonnegative():
    """Concave data (a negative quadratic term fits it best) gives c = 0, not c < 0."""
    lens = [16, 64, 128, 256, 512, 1024, 2048]
    prefill = [([n], 5.0 + 0.01 * n - 1e-6 * n * n) for n in lens]
    decode = [([n] * b, 1.0 + 1e-3 * b * (n + 1) + 0.05 * b) for b in (1, 4, 16) for n in (100, 1000)]
    fit = fit_profile(prefill=prefill, decode=decode)
    assert min(fit.prefill) >= 0 and fit.prefill[2] == 0.0 and fit.prefill[1] > 0
    np.testing.assert_allclose(fit.decode_small, (1.0, 1e-3, 0.05), rtol=1e-6)


def test_mixed_step_costs_the_split_program_with_buckets():
    """Padded buckets: decode region B_pad x S_pad and prefill region T_pad x S_pad, S_pad the
    shared block-table width (models/attention.py); without max_keys the plain forms."""
    from dsjax.planner.buckets import ShapeBuckets

    c = LatencyCoeffs(prefill=(2.0, 0.05, 1e-4), decode_small=(1.0, 0.001, 0.04), decode_large=(1.0, 0.001, 0.04))
    lat = LatencyModel(coeffs=c, buckets=ShapeBuckets(block_size=16, attention="padded"))
    # 5 decodes (longest ctx+1 = 300 -> 512 padded keys), one 100-token chunk ending at 100
    got = lat.mixed_step_s(100, 100 * 100, 5, 5 * 250, num_chunks=1, chunk_max_keys=100, decode_max_keys=300) * 1e3
    t_pad, s_pad, b_pad = 128, 512, 8
    assert got == pytest.approx(2.0 + 0.05 * t_pad + 1e-4 * t_pad * s_pad + 0.001 * b_pad * s_pad + 0.04 * b_pad)
    plain = lat.mixed_step_s(100, 100 * 100, 5, 5 * 250) * 1e3
    assert plain == pytest.approx(2.0 + 0.05 * 100 + 1e-4 * 100 * 100 + 0.001 * 5 * 250 + 0.04 * 5)
    two = lat.mixed_step_s(100, 100 * 100, 5, 5 * 250, chunk_max_keys=100, decode_max_keys=300, fused=False) * 1e3
    # a prefill of the chunk (T_pad 128 x 128 keys: 100 keys -> 8 blocks) plus a whole decode step (8 x 512 keys)
    assert two == pytest.approx(2.0 + 0.05 * 128 + 1e-4 * 128 * 128 + 1.0 + 0.001 * 8 * 512 + 0.04 * 8)
