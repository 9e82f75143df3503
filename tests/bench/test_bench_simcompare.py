"""The served calibration's KV transfer fit (dsjax/benchmark/simcompare.py)."""

import pytest

from dsjax.benchmark.simcompare import fit_transfer


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
