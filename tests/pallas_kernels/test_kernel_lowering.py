"""Every shipped kernel configuration lowers for CUDA on this CPU-only machine.

`jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))` runs the Pallas -> Triton IR lowering
in Python, so GPU-only errors (non-power-of-2 tensors, unsupported ops, bad dot shapes) show up in
CI without a GPU. With jaxlib <= 0.10.2 the Triton module is embedded in the HLO for XLA to compile
later; we also parse it back and run the MLIR verifier over it (private API, best effort). Newer
jaxlibs compile Triton to PTX during lowering, which needs the CUDA plugin: without it these tests
skip.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import paged_decode_attention, ragged_prefill_attention
from pallas_kernels.block_sizes import DECODE_BLOCK_SIZES, PREFILL_BLOCK_SIZES

S = jax.ShapeDtypeStruct
NUM_KV_HEADS = 4
GROUPS = (1, 3, 8)  # MHA, a non-power-of-2 group, GQA 8


def _lower_for_cuda(fn, *args, **kwargs):
    try:
        return fn.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if "compilation handler" in str(e):
            pytest.skip(f"this jaxlib compiles Triton while lowering and has no CUDA plugin: {e}")
        raise


def _triton_modules_verify(lowered) -> list[bool]:
    """Parses each embedded Triton module and runs the MLIR verifier; [] if none can be read."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError:
        return []
    results = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    child = child.operation
                    if child.name == "stablehlo.custom_call" and "mhlo.backend_config" in child.attributes:
                        config = ir.DictAttr(child.attributes["mhlo.backend_config"])
                        if "ir" in config:
                            with triton_lowering._new_ir_context():
                                module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
                                results.append(module.operation.verify())
                    walk(child)

    walk(lowered.compiler_ir("stablehlo").operation)
    return results


def _check_lowered(lowered):
    text = lowered.as_text()
    assert "triton" in text, "expected a Triton custom call in the lowered module"
    verified = _triton_modules_verify(lowered)
    assert all(verified), "a Triton module failed MLIR verification"


def _cache(head_dim, dtype, block_size=16, num_blocks=64):
    return S((num_blocks, NUM_KV_HEADS, block_size, head_dim), dtype)  # head-major


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim, dtype_name", sorted(PREFILL_BLOCK_SIZES))
def test_prefill_lowers_for_cuda(head_dim, dtype_name, group):
    dtype = jnp.dtype(dtype_name)
    num_tokens, batch, max_blocks = 300, 5, 12
    args = (
        S((num_tokens, NUM_KV_HEADS * group, head_dim), dtype),
        _cache(head_dim, dtype),
        _cache(head_dim, dtype),
        S((batch, max_blocks), jnp.int32),
        S((batch + 1,), jnp.int32),
        S((batch,), jnp.int32),
    )
    _check_lowered(_lower_for_cuda(ragged_prefill_attention, *args, sm_scale=0.125, interpret=False))


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim, dtype_name", sorted(DECODE_BLOCK_SIZES))
def test_decode_lowers_for_cuda(head_dim, dtype_name, group):
    dtype = jnp.dtype(dtype_name)
    batch, max_blocks = 3, 40  # few long requests: the heuristic picks several splits
    args = (
        S((batch, NUM_KV_HEADS * group, head_dim), dtype),
        _cache(head_dim, dtype),
        _cache(head_dim, dtype),
        S((batch, max_blocks), jnp.int32),
        S((batch,), jnp.int32),
    )
    _check_lowered(_lower_for_cuda(paged_decode_attention, *args, sm_scale=0.125, interpret=False))
    _check_lowered(_lower_for_cuda(paged_decode_attention, *args, sm_scale=0.125, interpret=False, num_splits=1))


@pytest.mark.parametrize("block_size", [8, 32])
def test_engine_block_sizes_lower_for_cuda(block_size):
    dtype, head_dim = jnp.bfloat16, 128
    cache = _cache(head_dim, dtype, block_size=block_size)
    prefill_args = (
        S((128, 2 * NUM_KV_HEADS, head_dim), dtype), cache, cache, S((2, 9), jnp.int32), S((3,), jnp.int32),
        S((2,), jnp.int32),
    )  # fmt: skip
    _check_lowered(_lower_for_cuda(ragged_prefill_attention, *prefill_args, sm_scale=0.1, interpret=False))
    decode_args = (S((2, 2 * NUM_KV_HEADS, head_dim), dtype), cache, cache, S((2, 9), jnp.int32), S((2,), jnp.int32))
    _check_lowered(_lower_for_cuda(paged_decode_attention, *decode_args, sm_scale=0.1, interpret=False))


def test_large_cache_lowers_with_64bit_offsets():
    """A cache over 4 GiB per layer makes Triton address it with 64-bit offsets; it must still lower."""
    dtype, head_dim = jnp.bfloat16, 128
    cache = S((140_000, 8, 16, head_dim), dtype)  # 140000 * 8 * 16 * 128 * 2 bytes = 4.3 GiB
    args = (S((4, 32, head_dim), dtype), cache, cache, S((4, 2048), jnp.int32), S((4,), jnp.int32))
    _check_lowered(_lower_for_cuda(paged_decode_attention, *args, sm_scale=0.1, interpret=False))
