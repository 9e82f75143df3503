"""Bad inputs raise ValueError naming the offending values (at trace time, nothing is compiled)."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import (
    DecodeBlockSizes,
    PrefillBlockSizes,
    decode_block_sizes,
    paged_decode_attention,
    prefill_block_sizes,
    ragged_prefill_attention,
)

S = jax.ShapeDtypeStruct
F32, BF16, I32 = jnp.float32, jnp.bfloat16, jnp.int32


def _prefill_args(**overrides):
    """Abstract arguments of a valid prefill call (T=12, Hq=8, Hkv=2, D=16, B=3), with overrides.

    Caches are head-major [num_blocks=10, Hkv=2, block_size=8, D=16].
    """
    args = dict(
        q=S((12, 8, 16), F32),
        k_cache=S((10, 2, 8, 16), F32),
        v_cache=S((10, 2, 8, 16), F32),
        block_tables=S((3, 4), I32),
        cu_q_lens=S((4,), I32),
        kv_lens=S((3,), I32),
    )
    args.update(overrides)
    return args


def _decode_args(**overrides):
    args = dict(
        q=S((3, 8, 16), F32),
        k_cache=S((10, 2, 8, 16), F32),
        v_cache=S((10, 2, 8, 16), F32),
        block_tables=S((3, 4), I32),
        kv_lens=S((3,), I32),
    )
    args.update(overrides)
    return args


def _trace(fn, args, **kwargs):
    kwargs.setdefault("sm_scale", 0.25)
    return fn.trace(*args.values(), **kwargs)


def test_valid_arguments_trace():
    _trace(ragged_prefill_attention, _prefill_args())
    _trace(paged_decode_attention, _decode_args())


COMMON_CASES = [
    ({"q": S((12, 8), F32)}, "q must have rank 3"),
    ({"k_cache": S((10, 8, 32), F32)}, "k_cache must have rank 4"),
    ({"v_cache": S((10, 2, 8, 16, 1), F32)}, "v_cache must have rank 4"),
    ({"v_cache": S((11, 2, 8, 16), F32)}, "k_cache and v_cache must have the same shape"),
    (
        {"k_cache": S((10, 3, 8, 16), F32), "v_cache": S((10, 3, 8, 16), F32)},
        "num_q_heads=8 must be divisible by num_kv_heads=3",
    ),
    ({"k_cache": S((10, 2, 8, 16), BF16), "v_cache": S((10, 2, 8, 16), BF16)}, "must share a dtype"),
    ({"k_cache": S((10, 2, 8, 32), F32), "v_cache": S((10, 2, 8, 32), F32)}, "does not match the cache's head_dim=32"),
    ({"block_tables": S((3, 4), F32)}, "block_tables must be int32"),
    ({"block_tables": S((3, 0), I32)}, "block_tables has no columns"),
]


@pytest.mark.parametrize("overrides, message", COMMON_CASES)
def test_prefill_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        _trace(ragged_prefill_attention, _prefill_args(**overrides))


@pytest.mark.parametrize("overrides, message", COMMON_CASES)
def test_decode_rejects(overrides, message):
    if "q" in overrides:  # the rank-2 q of the shared case, at decode's batch size
        overrides = {"q": S((3, 8), F32)}
    with pytest.raises(ValueError, match=message):
        _trace(paged_decode_attention, _decode_args(**overrides))


def test_head_count_error_names_the_head_major_layout():
    """The KV heads are read from axis 1: a message about them says so and shows the cache shape."""
    cache = S((10, 3, 8, 16), F32)
    with pytest.raises(ValueError, match=r"axis 1 of the head-major cache .*k_cache.shape=\(10, 3, 8, 16\)"):
        _trace(paged_decode_attention, _decode_args(k_cache=cache, v_cache=cache))


def _all_dtype(dtype, head_dim=16):
    return dict(
        q=S((12, 8, head_dim), dtype), k_cache=S((10, 2, 8, head_dim), dtype), v_cache=S((10, 2, 8, head_dim), dtype)
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (_all_dtype(jnp.float16), "float16.* is not supported"),
        (_all_dtype(F32, head_dim=48), "head_dim=48 is not supported"),
        (_all_dtype(F32, head_dim=256), "head_dim=256 is not supported"),
        ({"cu_q_lens": S((3,), I32)}, r"cu_q_lens must have B \+ 1 entries"),
        ({"cu_q_lens": S((4, 1), I32)}, "cu_q_lens must have rank 1"),
        ({"kv_lens": S((3,), F32)}, "kv_lens must be int32"),
        ({"block_tables": S((2, 4), I32)}, "block_tables must have B rows"),
        ({"q": S((0, 8, 16), F32)}, "q has no rows"),
        ({"cu_q_lens": S((1,), I32), "kv_lens": S((0,), I32)}, "need at least one request"),
    ],
)
def test_prefill_specific_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        _trace(ragged_prefill_attention, _prefill_args(**overrides))


@pytest.mark.parametrize(
    "overrides, kwargs, message",
    [
        ({"kv_lens": S((4,), I32)}, {}, "must agree on B"),
        ({"block_tables": S((2, 4), I32)}, {}, "must agree on B"),
        ({"kv_lens": S((3, 1), I32)}, {}, "kv_lens must have rank 1"),
        ({}, {"num_splits": 0}, "num_splits must be a positive int"),
        ({}, {"sm_scale": -1.0}, "sm_scale must be finite and positive"),
        ({}, {"sm_scale": float("nan")}, "sm_scale must be finite and positive"),
    ],
)
def test_decode_specific_rejects(overrides, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _trace(paged_decode_attention, _decode_args(**overrides), **kwargs)


def test_block_size_tables_reject_unknown_shapes():
    with pytest.raises(ValueError, match="no prefill block sizes for head_dim=48"):
        prefill_block_sizes(head_dim=48, dtype=jnp.float32)
    with pytest.raises(ValueError, match="no decode block sizes for head_dim=16, dtype=float16"):
        decode_block_sizes(head_dim=16, dtype=jnp.float16)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PrefillBlockSizes(block_m=24, block_kv=16, num_warps=4, num_stages=2), "block_m=24 must be"),
        (lambda: PrefillBlockSizes(block_m=16, block_kv=8, num_warps=4, num_stages=2), "block_kv=8 must be .* >= 16"),
        (lambda: PrefillBlockSizes(block_m=16, block_kv=16, num_warps=3, num_stages=2), "num_warps=3 must be"),
        (
            lambda: DecodeBlockSizes(block_kv=16, max_num_splits=0, min_split_tokens=16, num_warps=4, num_stages=2),
            "max_num_splits=0 must be >= 1",
        ),
        (
            lambda: DecodeBlockSizes(block_kv=16, max_num_splits=4, min_split_tokens=16, num_warps=4, num_stages=0),
            "num_stages=0 must be >= 1",
        ),
    ],
)
def test_block_sizes_validate(make, message):
    with pytest.raises(ValueError, match=message):
        make()
