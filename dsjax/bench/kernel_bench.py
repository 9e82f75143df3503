"""Benchmark of the paged attention kernels against their jitted jnp (XLA) references.

    python -m dsjax.bench kernels                  # GPU: full grid; CPU: a small interpret-mode grid
    python -m dsjax.bench kernels --quick          # a few GPU cases
    python -m dsjax.bench kernels --lower-only     # lower the GPU grid for CUDA (works on CPU)
    python -m dsjax.bench kernels --kernel decode --json results.json

On a GPU it first measures the device's copy bandwidth (a large device-to-device copy) and bf16
matmul peak, then times every case and prints decode's achieved TB/s (KV bytes read / time) and
prefill's TFLOP/s (causal attention FLOPs / time) beside them. On CPU the kernels run in Pallas
interpret mode: those numbers time the interpreter, not a kernel, and the output says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from pallas_kernels.paged_decode import paged_decode_attention, paged_decode_reference
from pallas_kernels.ragged_prefill import ragged_prefill_attention, ragged_prefill_reference

GIB = 1 << 30
# (num_q_heads, num_kv_heads): heads 8..64 at GQA ratios 1, 4, 8 (and MQA-like 64:8).
GPU_HEADS = ((8, 8), (32, 8), (64, 8), (32, 4))
GPU_CONTEXTS = (512, 2048, 8192, 32768)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeCase:
    batch: int
    context: int  # kv_len of every request
    num_q_heads: int
    num_kv_heads: int
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "bfloat16"

    @property
    def kind(self) -> str:
        return "decode"

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    def kv_bytes(self) -> int:
        """Bytes of K and V the kernel must read."""
        return 2 * self.batch * self.context * self.num_kv_heads * self.head_dim * self.itemsize

    def reference_bytes(self) -> int:
        """The reference's float32 gathered K and V (its largest intermediates)."""
        return 2 * self.kv_bytes() * 4 // self.itemsize

    def work(self) -> float:
        return self.kv_bytes()

    def label(self) -> str:
        return (
            f"decode  B={self.batch:<4} ctx={self.context:<6} H={self.num_q_heads}/{self.num_kv_heads:<2} "
            f"D={self.head_dim} {self.dtype}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillCase:
    batch: int
    q_len: int  # new tokens per request
    context: int  # kv_len per request (cached prefix = context - q_len)
    num_q_heads: int
    num_kv_heads: int
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "bfloat16"

    @property
    def kind(self) -> str:
        return "prefill"

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    def kv_bytes(self) -> int:
        return 2 * self.batch * self.context * self.num_kv_heads * self.head_dim * self.itemsize

    def flops(self) -> float:
        """Causal attention FLOPs: 2 matmuls x 2 FLOPs per multiply-add over the visible keys."""
        prefix = self.context - self.q_len
        visible_keys = self.q_len * prefix + self.q_len * (self.q_len + 1) / 2
        return 4.0 * self.batch * self.num_q_heads * self.head_dim * visible_keys

    def reference_bytes(self) -> int:
        """The reference gathers each query row's request KV in float32: [T, Hkv, S, D] twice."""
        num_tokens = self.batch * self.q_len
        return 2 * num_tokens * self.context * self.num_kv_heads * self.head_dim * 4

    def work(self) -> float:
        return self.flops()

    def label(self) -> str:
        return (
            f"prefill B={self.batch:<4} q={self.q_len:<6} ctx={self.context:<6} H={self.num_q_heads}/"
            f"{self.num_kv_heads:<2} D={self.head_dim} {self.dtype}"
        )


def gpu_grid(*, quick: bool, max_gib: float) -> list:
    """Decode: batch x context x heads; prefill: fresh prompts and a cached-prefix chunk."""
    cases = []
    decode_batches = (1, 8, 64) if quick else (1, 8, 32, 128)
    for batch in decode_batches:
        for context in GPU_CONTEXTS[::2] if quick else GPU_CONTEXTS:
            for num_q_heads, num_kv_heads in GPU_HEADS[:2] if quick else GPU_HEADS:
                case = DecodeCase(batch=batch, context=context, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
                if case.kv_bytes() <= max_gib * GIB:
                    cases.append(case)
    for batch, q_len, context in ((1, 512, 512), (4, 2048, 2048), (1, 8192, 8192), (8, 512, 8192), (1, 1024, 32768)):
        if quick and context > 8192:
            continue
        for num_q_heads, num_kv_heads in GPU_HEADS[:2] if quick else GPU_HEADS:
            cases.append(
                PrefillCase(
                    batch=batch, q_len=q_len, context=context, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads
                )
            )
    return cases


def cpu_grid() -> list:
    """Tiny shapes: interpret mode runs the kernel body as XLA-on-CPU loops."""
    return [
        DecodeCase(batch=1, context=256, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="float32"),
        DecodeCase(batch=4, context=512, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="float32"),
        PrefillCase(batch=1, q_len=64, context=64, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="float32"),
        PrefillCase(batch=2, q_len=64, context=192, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="float32"),
    ]


def make_inputs(case, key):
    """Device arrays for one case: a shuffled block table over a cache holding exactly the contexts."""
    dtype = jnp.dtype(case.dtype)
    blocks_per_request = -(-case.context // case.block_size)
    num_blocks = case.batch * blocks_per_request
    k_key, v_key, q_key, perm_key = jax.random.split(key, 4)
    cache_shape = (num_blocks, case.num_kv_heads, case.block_size, case.head_dim)  # head-major pool
    k_cache = jax.random.normal(k_key, cache_shape, dtype)
    v_cache = jax.random.normal(v_key, cache_shape, dtype)
    block_tables = jax.random.permutation(perm_key, num_blocks).astype(jnp.int32).reshape(case.batch, -1)
    kv_lens = jnp.full((case.batch,), case.context, jnp.int32)
    if case.kind == "decode":
        q = jax.random.normal(q_key, (case.batch, case.num_q_heads, case.head_dim), dtype)
        return q, k_cache, v_cache, block_tables, kv_lens
    q = jax.random.normal(q_key, (case.batch * case.q_len, case.num_q_heads, case.head_dim), dtype)
    cu_q_lens = jnp.arange(case.batch + 1, dtype=jnp.int32) * case.q_len
    return q, k_cache, v_cache, block_tables, cu_q_lens, kv_lens


def _entries(case):
    """(Pallas entry, jnp reference) for the case's kernel."""
    if case.kind == "decode":
        return paged_decode_attention, paged_decode_reference
    return ragged_prefill_attention, ragged_prefill_reference


def _sm_scale(case) -> float:
    return 1.0 / math.sqrt(case.head_dim)


def kernel_fn(case, *, interpret: bool):
    entry, _ = _entries(case)
    return functools.partial(entry, sm_scale=_sm_scale(case), interpret=interpret)


def reference_fn(case):
    _, reference = _entries(case)
    return jax.jit(functools.partial(reference, sm_scale=_sm_scale(case)))


def time_call(fn, args, *, iters: int, repeats: int = 3) -> float:
    """Median over `repeats` of the mean time of `iters` back-to-back calls (after one warm-up)."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def measure_copy_bandwidth(num_bytes: int = 2 * GIB) -> float:
    """Device-to-device bandwidth in bytes/s: a large elementwise copy reads and writes every byte."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * num_bytes / time_call(copy, (x,), iters=10)


def measure_matmul_peak(n: int = 8192) -> float:
    """bf16 matmul FLOP/s on an n x n x n product."""
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * n**3 / time_call(matmul, (a, a), iters=10)


def _achieved(case, seconds: float) -> str:
    if case.kind == "decode":
        return f"{case.kv_bytes() / seconds / 1e12:7.3f} TB/s"
    return f"{case.flops() / seconds / 1e12:7.2f} TFLOP/s"


def run_cases(cases, *, interpret: bool, iters: int, max_reference_gib: float):
    rows = []
    key = jax.random.PRNGKey(0)
    for case in tqdm(cases, desc="cases", unit="case", file=sys.stderr):
        args = make_inputs(case, key)
        kernel_s = time_call(kernel_fn(case, interpret=interpret), args, iters=iters)
        reference_s = None
        if case.reference_bytes() <= max_reference_gib * GIB:
            reference_s = time_call(reference_fn(case), args, iters=iters)
        row = dict(
            case=dataclasses.asdict(case), kind=case.kind, kernel_ms=kernel_s * 1e3,
            reference_ms=None if reference_s is None else reference_s * 1e3,
        )  # fmt: skip
        ref_text = "      (skipped: too big)" if reference_s is None else f"{reference_s * 1e3:10.3f} ms"
        speedup = "" if reference_s is None else f"  x{reference_s / kernel_s:6.2f}"
        tqdm.write(
            f"{case.label():<58} kernel {kernel_s * 1e3:10.3f} ms  {_achieved(case, kernel_s)}   "
            f"xla {ref_text}{speedup}"
        )
        rows.append(row)
        del args
    return rows


def lower_cases(cases) -> int:
    """Lowers each case for CUDA with abstract inputs (no device memory); returns the failure count."""
    failures = 0
    for case in tqdm(cases, desc="lowering for cuda", unit="case", file=sys.stderr):
        abstract = jax.eval_shape(functools.partial(make_inputs, case), jax.random.PRNGKey(0))
        entry, _ = _entries(case)
        try:
            entry.trace(*abstract, sm_scale=_sm_scale(case), interpret=False).lower(lowering_platforms=("cuda",))
            status = "ok"
        except Exception as e:  # report every failing case, then exit non-zero
            failures += 1
            status = f"FAILED: {type(e).__name__}: {e}"
        tqdm.write(f"{case.label():<58} lower(cuda) {status}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsjax.bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=("decode", "prefill", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="a few GPU cases instead of the full grid")
    parser.add_argument("--lower-only", action="store_true", help="lower the GPU grid for CUDA; run nothing")
    parser.add_argument("--iters", type=int, default=None, help="calls per timing sample")
    parser.add_argument("--max-kv-gib", type=float, default=16.0, help="skip decode cases with more KV than this")
    parser.add_argument("--max-reference-gib", type=float, default=8.0, help="skip the XLA reference above this")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    cases = gpu_grid(quick=args.quick, max_gib=args.max_kv_gib) if (on_gpu or args.lower_only) else cpu_grid()
    if args.kernel != "both":
        cases = [case for case in cases if case.kind == args.kernel]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")

    if args.lower_only:
        failures = lower_cases(cases)
        print(f"lowered {len(cases) - failures}/{len(cases)} GPU cases for CUDA")
        return 1 if failures else 0

    result = dict(jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0]))
    if on_gpu:
        copy_bw, matmul_peak = measure_copy_bandwidth(), measure_matmul_peak()
        result.update(copy_bandwidth_tb_s=copy_bw / 1e12, matmul_peak_tflop_s=matmul_peak / 1e12)
        print(f"device copy bandwidth {copy_bw / 1e12:.2f} TB/s, bf16 matmul peak {matmul_peak / 1e12:.1f} TFLOP/s")
        iters = args.iters or 20
    else:
        print("No GPU: running a small grid in Pallas INTERPRET mode on CPU. These times measure the")
        print("interpreter (the kernel body run as XLA-on-CPU loops), not a kernel; TB/s and TFLOP/s")
        print("below are only arithmetic on those times and say nothing about GPU performance.")
        iters = args.iters or 2
    print("columns: case | Pallas kernel time, achieved rate | jitted jnp reference (XLA) time, speedup xla/kernel")
    result["rows"] = run_cases(cases, interpret=not on_gpu, iters=iters, max_reference_gib=args.max_reference_gib)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
