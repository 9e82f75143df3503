"""Rotary position embedding: the inverse frequencies (plain or scaled) and their application.

Layout: half-split ("rotate_half", as Hugging Face LLaMA / Qwen / Mistral): for a head vector x of
even size D, pair i is (x[i], x[i + D/2]) for i < D/2, rotated by the angle position * inv_freq[i].
HF checkpoints store q/k projections in this layout, so no permutation is needed when loading.

The frequencies depend only on the static config, so they are computed on the host in float64
(`inv_freq`) and enter the program as a constant; the angles and rotation run in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from models.config import RopeScaling


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """[head_dim / 2] float32 inverse frequencies for RoPE with base `theta`, optionally scaled."""
    base = theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freq = 1.0 / base
    if scaling is None or scaling.rope_type == "dynamic":
        # dynamic NTK equals plain RoPE up to original_max_position, and ModelConfig keeps the
        # context within it (see RopeScaling).
        return freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (freq / scaling.factor).astype(np.float32)
    return _llama3(freq, scaling).astype(np.float32)


def _llama3(freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3.1's banded scaling: keep short wavelengths (high frequencies), divide long ones by
    `factor`, and blend linearly in 1/wavelength between the two band edges."""
    wavelen = 2 * math.pi / freq
    long_edge = s.original_max_position / s.low_freq_factor  # longer than this: scaled by 1/factor
    short_edge = s.original_max_position / s.high_freq_factor  # shorter than this: unchanged
    scaled = np.where(wavelen > long_edge, freq / s.factor, freq)
    # smooth = 0 at the long edge, 1 at the short edge
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    between = (wavelen >= short_edge) & (wavelen <= long_edge)
    return np.where(between, blended, scaled)


def apply_rope(x, positions, freq: np.ndarray):
    """x [T, H, D] rotated by positions [T] with inverse frequencies freq [D/2] (half-split pairs)."""
    d = x.shape[-1]
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(freq, jnp.float32)[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
