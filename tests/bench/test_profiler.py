"""The engine profiler: a tiny grid on tiny-llama, fitted, written in DistServe's schema, read back.

Tolerance: on its own grid the fit must predict the measured medians within 35% on average and
within a factor of 2 at worst. (tiny-llama's steps take ~1-5 ms, mostly host packing and dispatch,
on a shared 2-core machine; the bound is loose on purpose, the real check is the schema, the
bookkeeping and the round trip.)
"""

import json

import numpy as np
import pytest

from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.fitting import relative_errors
from dsjax.planner.latency import load_profile, save_profile
from dsjax.planner.model_spec import MemoryModel, get_model
from dsjax.planner.simulator import Simulator
from dsjax.planner.slo import SLO
from dsjax.workloads.trace_gen import FixedLengths, generate_trace

profiler = pytest.importorskip("dsjax.bench.profiler")

MEAN_TOL, MAX_TOL = 0.35, 1.0
TINY_GRID = profiler.ProfileGrid(
    prefill=((1, 16), (1, 32), (1, 64), (1, 128), (2, 32), (4, 16)),
    decode=((1, 15), (2, 63), (4, 31), (8, 15), (8, 127)),
    reps=3,
)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    profile = profiler.profile_engine("tiny-llama", tps=(1,), grid=TINY_GRID, progress=False)
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    save_profile(path, profile)
    return path


def test_profile_is_distserve_schema_with_metadata(tiny_profile):
    doc = json.loads(tiny_profile.read_text())
    assert set(doc) == {"tiny-llama", "metadata"}
    entry = doc["tiny-llama"]["1"]
    assert set(entry) == {"prefill", "decoding_smallbs", "decoding_largebs", "decoding_large_small_bs_threshold"}
    for key in ("prefill", "decoding_smallbs", "decoding_largebs"):
        assert len(entry[key]) == 3 and all(isinstance(x, float) for x in entry[key])
    meta = doc["metadata"]
    for key in ("device", "platform", "dtype", "date", "jax_version", "grid", "fit", "shape_buckets", "samples"):
        assert key in meta, key
    assert meta["platform"] == "cpu" and meta["dtype"] == "float32"
    assert meta["grid"]["prefill"] == [list(p) for p in TINY_GRID.prefill]
    assert meta["prefill_512_ms"] > 0 and meta["decode_bs1_ctx512_ms"] > 0
    assert 0 <= meta["fit"]["1"]["mean_rel_err"] <= meta["fit"]["1"]["max_rel_err"]
    assert meta["shape_buckets"] == {"block_size": 16, "attention": "padded"}  # the XLA path on CPU


def test_fit_predicts_the_grid(tiny_profile):
    profile = load_profile(tiny_profile)
    samples = profile.metadata["samples"]["1"]
    prefill = [([n] * b, ms) for b, n, ms in samples["prefill"]]
    decode = [([n] * b, ms) for b, n, ms in samples["decode"]]
    assert len(prefill) == len(TINY_GRID.prefill) and len(decode) == len(TINY_GRID.decode)
    pre, dec = relative_errors(profile.coeffs("tiny-llama", 1), prefill=prefill, decode=decode, buckets=profile.buckets)
    errors = np.abs(np.concatenate([pre, dec]))
    assert errors.mean() <= MEAN_TOL and errors.max() <= MAX_TOL, errors
    assert profile.metadata["fit"]["1"]["mean_rel_err"] == pytest.approx(errors.mean(), rel=1e-2)  # samples are rounded


def test_latency_model_loads_it_back_and_simulates(tiny_profile):
    profile = load_profile(tiny_profile)
    assert profile.buckets == ShapeBuckets(block_size=16, attention="padded")
    lat = profile.latency("tiny-llama", tp=1)
    assert lat.buckets == profile.buckets
    b, n, ms = profile.metadata["samples"]["1"]["prefill"][2]
    assert lat.prefill_ms(b * n, b * n * n, b, n) == pytest.approx(ms, rel=MAX_TOL)
    assert lat.prefill_ms(50, 2500) == lat.prefill_ms(64, 64 * 64)  # a 50-token prompt runs the 64 x 64 program
    model = get_model("tiny-llama")
    sim = Simulator(placement=Placement(prefill=PhaseParallel(), decode=PhaseParallel()), profile=profile,
                    model=model, memory=MemoryModel(model=model))
    trace = generate_trace(num_requests=50, rate=20.0, lengths=FixedLengths(prompt_len=40, output_len=8), seed=0)
    result = sim.run(trace, slo=SLO(ttft_s=10.0, tpot_s=1.0))
    assert np.isfinite(result.ttft_s).all() and result.attainment == 1.0


def test_quick_grid_is_bucket_aligned():
    for max_len in (512, 2048):
        grid = profiler.ProfileGrid.quick(max_len=max_len)
        assert len(grid.prefill) + len(grid.decode) <= 16
        for b, n in grid.prefill:
            assert b & (b - 1) == 0 and n % 16 == 0 and (n // 16) & (n // 16 - 1) == 0 and n <= max_len
        for b, ctx in grid.decode:
            blocks = (ctx + 1) // 16
            assert b & (b - 1) == 0 and (ctx + 1) % 16 == 0 and blocks & (blocks - 1) == 0 and ctx + 1 <= max_len
    full = profiler.ProfileGrid.full(max_len=2048, kv_token_budget=64 * 1024)
    assert all(b * (ctx + 1) <= 64 * 1024 for b, ctx in full.decode)
    assert any(b >= 95 for b, _ in full.decode)  # the large-batch regime gets its own fit


def test_grid_validation():
    with pytest.raises(ValueError, match=">= 3 distinct"):
        profiler.ProfileGrid(prefill=((1, 16), (1, 32)), decode=((1, 15), (2, 15), (4, 15)))
    with pytest.raises(ValueError, match="batch >= 1"):
        profiler.ProfileGrid(prefill=((0, 16), (1, 32), (1, 64)), decode=((1, 15), (2, 15), (4, 15)))
    with pytest.raises(ValueError, match="devices"):
        profiler.build_runner(None, None, None, phase=PhaseParallel(tp=64, pp=1))


@pytest.mark.slow
def test_cli_profile_tp1_tp2(tmp_path, capsys):
    """The CLI end to end with TP 1 and 2 (fake CPU devices from conftest), quick grid capped at 64."""
    from dsjax.plan import main

    out = tmp_path / "p.json"
    assert main(["profile", "--model", "tiny-llama", "--tp", "1,2", "--quick", "--max-len", "64", "--reps", "1",
                 "--no-progress", "--out", str(out)]) == 0
    profile = load_profile(out)
    assert profile.tp_degrees("tiny-llama") == (1, 2)
    assert set(profile.metadata["isolated"]) == {"1", "2"}
    assert "prefill_512_ms" in capsys.readouterr().out
