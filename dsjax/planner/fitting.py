"""Fitting DistServe's latency forms (latency.py) to measured step times.

Every fit is least squares on *relative* error with non-negative coefficients (a step cannot get
cheaper as tokens or requests are added). The features of one sample are a row [1, f1, f2]:

    prefill_row(lens)  = [1, sum(len), sum(len^2)]          # a + b*sum(len) + c*sum(len^2)
    decode_row(ctx)    = [1, sum(ctx + 1), batch]           # a + b*sum(ctx+1) + c*batch

computed on the engine's padded shape when `buckets` are given (buckets.py), so a fit and the
predictions made from it see the same features. Used by the engine profiler (profiler.py) and the
served-step fit (served.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.latency import DEFAULT_LARGE_BS_THRESHOLD, Coeffs, LatencyCoeffs, LatencyModel


def _fit_relative(features: np.ndarray, observed_ms: np.ndarray) -> Coeffs:
    """argmin_{beta >= 0} sum(((X beta - y) / y)^2): least squares on rows scaled by 1/y.

    Coefficients are kept >= 0 (a time cannot shrink as tokens or requests are added; noisy
    measurements otherwise trade a negative term against a positive one): with three features the
    exact non-negative solution is the best unconstrained fit over the supports (subsets of
    features) whose solution is non-negative.
    """
    if np.any(observed_ms <= 0):
        raise ValueError(f"observed times must be > 0 ms, got min {float(observed_ms.min())}")
    a = features / observed_ms[:, None]
    ones = np.ones(len(observed_ms))
    best: tuple[float, np.ndarray] | None = None
    k = a.shape[1]
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(a[:, cols], ones, rcond=None)
        if np.any(sol < 0):
            continue
        beta = np.zeros(k)
        beta[cols] = sol
        loss = float(np.sum((a @ beta - ones) ** 2))
        if best is None or loss < best[0] - 1e-12 * max(loss, 1.0):
            best = (loss, beta)
    beta = best[1] if best is not None else np.zeros(k)
    return (float(beta[0]), float(beta[1]), float(beta[2]))


def prefill_row(lens: Sequence[int], buckets: ShapeBuckets | None) -> list[float]:
    sum_len, sum_sq = float(sum(lens)), float(sum(l * l for l in lens))
    if buckets is not None:
        sum_len, sum_sq = buckets.prefill_features(sum_len, sum_sq, len(lens), max(lens))
    return [1.0, sum_len, sum_sq]


def decode_row(ctx: Sequence[int], buckets: ShapeBuckets | None) -> list[float]:
    batch, sum_ctx = len(ctx), float(sum(c + 1 for c in ctx))
    if buckets is not None:
        batch, sum_ctx = buckets.decode_features(batch, sum_ctx, max(ctx) + 1)
    return [1.0, sum_ctx, float(batch)]


def prefill_sample_ms(lat: LatencyModel, lens: Sequence[int]) -> float:
    """The model's time (ms) of one prefill batch of prompts of lengths `lens`."""
    return lat.prefill_ms(sum(lens), sum(x * x for x in lens), len(lens), max(lens))


def decode_sample_ms(lat: LatencyModel, ctx: Sequence[int]) -> float:
    """The model's time (ms) of one decode step of requests with contexts `ctx`."""
    return lat.decode_step_s(len(ctx), sum(c + 1 for c in ctx), max(ctx) + 1) * 1e3


def _fit_samples(samples: Sequence[tuple[Sequence[int], float]], row, buckets: ShapeBuckets | None, kind: str) -> Coeffs:
    if len(samples) < 3:
        raise ValueError(f"need at least 3 {kind} samples to fit 3 coefficients, got {len(samples)}")
    x = np.array([row(lens, buckets) for lens, _ in samples])
    return _fit_relative(x, np.array([float(ms) for _, ms in samples]))


def fit_prefill(samples: Sequence[tuple[Sequence[int], float]], buckets: ShapeBuckets | None = None) -> Coeffs:
    """Fit [a, b, c] of a + b*sum(len) + c*sum(len^2) from (prompt lengths of a batch, ms) samples
    (features of the padded shape with `buckets`)."""
    return _fit_samples(samples, prefill_row, buckets, "prefill")


def fit_decode(samples: Sequence[tuple[Sequence[int], float]], buckets: ShapeBuckets | None = None) -> Coeffs:
    """Fit [a, b, c] of a + b*sum(ctx+1) + c*batch from (context lengths of a batch, ms) samples
    (features of the padded shape with `buckets`)."""
    return _fit_samples(samples, decode_row, buckets, "decode")


def fit_profile(
    *,
    prefill: Sequence[tuple[Sequence[int], float]],
    decode: Sequence[tuple[Sequence[int], float]],
    large_bs_threshold: int = DEFAULT_LARGE_BS_THRESHOLD,
    buckets: ShapeBuckets | None = None,
) -> LatencyCoeffs:
    """Fit one (model, TP) entry from measured samples.

    prefill: (prompt lengths in the batch, measured ms); decode: (context lengths in the batch,
    measured ms; a request of context ctx attends ctx + 1 keys). Decode samples are split at
    `large_bs_threshold` (of the padded batch with `buckets`); a regime with fewer than 3 samples
    reuses the other regime's fit. With `buckets` the features are the padded shape's, and the
    profile must carry the same buckets in its metadata to be read back the same way.
    """
    def padded_batch(ctx: Sequence[int]) -> int:
        return len(ctx) if buckets is None else buckets.decode_features(len(ctx), 0.0, 1)[0]

    small = [s for s in decode if padded_batch(s[0]) < large_bs_threshold]
    large = [s for s in decode if padded_batch(s[0]) >= large_bs_threshold]
    if len(small) < 3 and len(large) < 3:
        raise ValueError(f"need at least 3 decode samples in one batch-size regime, got {len(small)} small and {len(large)} large")
    small_c = fit_decode(small, buckets) if len(small) >= 3 else None
    large_c = fit_decode(large, buckets) if len(large) >= 3 else None
    return LatencyCoeffs(
        prefill=fit_prefill(prefill, buckets),
        decode_small=small_c or large_c,
        decode_large=large_c or small_c,
        large_bs_threshold=large_bs_threshold,
    )


def relative_errors(
    coeffs: LatencyCoeffs,
    *,
    prefill: Sequence[tuple[Sequence[int], float]],
    decode: Sequence[tuple[Sequence[int], float]],
    buckets: ShapeBuckets | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted - measured) / measured of every prefill and every decode sample."""
    lat = LatencyModel(coeffs=coeffs, buckets=buckets)
    pre = [(prefill_sample_ms(lat, lens) - ms) / ms for lens, ms in prefill]
    dec = [(decode_sample_ms(lat, ctx) - ms) / ms for ctx, ms in decode]
    return np.array(pre), np.array(dec)
