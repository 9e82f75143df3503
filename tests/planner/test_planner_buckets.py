"""Shape buckets: simulated steps cost the engine's padded program shapes (dsjax/engine/shapes.py)."""

import numpy as np
import pytest

from dsjax.engine import shapes
from dsjax.engine.placement import Placement
from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.fitting import fit_profile, relative_errors
from dsjax.planner.latency import LatencyCoeffs, LatencyModel, Profile
from dsjax.planner.model_spec import MemoryModel, get_model
from dsjax.planner.simulator import SimConfig, Simulator

COEFFS = LatencyCoeffs(prefill=(3.0, 0.01, 2e-5), decode_small=(1.5, 1e-3, 0.05), decode_large=(1.0, 1e-3, 0.08))
DENSE = ShapeBuckets(block_size=16, attention="dense")
RAGGED = ShapeBuckets(block_size=16, attention="ragged")
PADDED = ShapeBuckets(block_size=16, attention="padded")


def test_prefill_features_follow_the_engine_buckets():
    # Prompts 300 + 20 + 20: T = 340 -> 512, B = 3 -> 4, longest 300 -> 19 blocks -> 32 -> 512 keys.
    assert shapes.prefill_bucket(340, 3, 19) == (512, 4, 32)
    assert DENSE.prefill_features(340, 300**2 + 2 * 20**2, 3, 300) == (512, 512 * 4 * 512)
    assert RAGGED.prefill_features(340, 300**2 + 2 * 20**2, 3, 300) == (512, 300**2 + 2 * 20**2)
    assert PADDED.prefill_features(340, 300**2 + 2 * 20**2, 3, 300) == (512, 512 * 512)
    assert PADDED.prefill_features(684, 684**2, 1, 684) == (1024, 1024 * 1024)  # 43 blocks -> 64
    assert DENSE.prefill_features(5, 25, 1, 5) == (16, 16 * 1 * 16)  # at least 16 tokens
    # A uniform aligned batch is its own bucket: dense quadratic = (B l)^2, padded = ragged = B l^2.
    assert DENSE.prefill_features(4 * 64, 4 * 64**2, 4, 64) == (256, 256**2)
    assert PADDED.prefill_features(4 * 64, 4 * 64**2, 4, 64) == RAGGED.prefill_features(4 * 64, 4 * 64**2, 4, 64) == (256, 4 * 64**2)


def test_decode_features_and_reshape_steps():
    b_pad, _ = shapes.decode_bucket(5, 1)
    assert DENSE.decode_features(5, 5 * 100, 120) == (b_pad, b_pad * 128)  # 120 keys -> 8 blocks -> 128
    assert RAGGED.decode_features(5, 500, 120) == (b_pad, 500)
    assert PADDED.decode_features(5, 500, 120) == DENSE.decode_features(5, 500, 120)
    assert DENSE.steps_to_reshape(120) == 9  # 128 - 120 + 1: the ninth step needs 129 keys
    assert DENSE.steps_to_reshape(128) == 1 and PADDED.steps_to_reshape(120) == 9
    assert RAGGED.steps_to_reshape(120) is None


def test_latency_model_costs_the_bucket():
    lat = LatencyModel(coeffs=COEFFS, buckets=DENSE)
    plain = LatencyModel(coeffs=COEFFS)
    assert lat.prefill_ms(100, 100**2) == lat.prefill_ms(128, 128**2) == plain.prefill_ms(128, 128**2)
    assert plain.prefill_ms(100, 100**2) < plain.prefill_ms(128, 128**2)
    step, growth = lat.decode_linear_s(3, 3 * 60, 70)
    assert growth == 0.0 and step == pytest.approx(COEFFS.decode_ms(4, 4 * 128) * 1e-3)  # 70 keys: 5 -> 8 blocks
    assert lat.decode_steps_to_reshape(70) == 59 and plain.decode_steps_to_reshape(70) is None
    assert lat.saturating_prefill_tokens() == 2048  # 9 a / b = 2700, rounded down to a bucket


def test_profile_buckets_from_metadata_and_switch():
    assert Profile(entries={"m": {1: COEFFS}}).buckets is None  # DistServe's profiles: off
    profile = Profile(entries={"tiny-llama": {1: COEFFS}}, metadata={"shape_buckets": DENSE.to_json()})
    assert profile.buckets == DENSE
    assert profile.latency("tiny-llama", tp=1).buckets == DENSE
    assert profile.latency("tiny-llama", tp=1, use_buckets=False).buckets is None
    model = get_model("tiny-llama")
    sim = Simulator(placement=Placement(), profile=profile, model=model, memory=MemoryModel(model=model),
                    config=SimConfig(shape_buckets=False))
    assert sim.prefill.latency.buckets is None
    with pytest.raises(ValueError, match="attention"):
        ShapeBuckets(attention="flash")
    with pytest.raises(ValueError, match="unknown fields"):
        ShapeBuckets.from_json({"block": 16})


@pytest.mark.parametrize("buckets", [DENSE, PADDED, RAGGED])
def test_fit_with_buckets_recovers_coefficients(buckets):
    rng = np.random.default_rng(0)
    lat = LatencyModel(coeffs=COEFFS, buckets=buckets)
    prefill = []
    for _ in range(30):
        lens = rng.integers(16, 600, size=rng.integers(1, 5)).tolist()
        prefill.append((lens, lat.prefill_ms(sum(lens), sum(x * x for x in lens), len(lens), max(lens))))
    decode = []
    for bs in (1, 2, 3, 8, 13, 40, 64):
        for _ in range(3):
            ctx = rng.integers(10, 1500, size=bs).tolist()
            decode.append((ctx, lat.decode_step_s(bs, sum(c + 1 for c in ctx), max(ctx) + 1) * 1e3))
    fit = fit_profile(prefill=prefill, decode=decode, buckets=buckets)
    np.testing.assert_allclose(fit.prefill, COEFFS.prefill, rtol=1e-6)
    np.testing.assert_allclose(fit.decode_small, COEFFS.decode_small, rtol=1e-6)
    pre, dec = relative_errors(fit, prefill=prefill, decode=decode, buckets=buckets)
    assert np.abs(pre).max() < 1e-9 and np.abs(dec).max() < 1e-9
