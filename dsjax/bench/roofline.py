"""What a decode step cannot beat: the weights read once (bytes / measured memory bandwidth) and the
same weights applied as one plain jitted matmul chain, the yardsticks `engine_bench` prints beside
every decode row.

A decode step reads every weight once whatever the batch, so where weights do not fit the
last-level cache (opt-125m in float32: 500 MB against 32 MB here) it is bound by memory bandwidth,
as on a GPU. The plain chain is the model's matrices and nothing else (no attention, norms, KV or
sampling): what XLA itself makes of those matmuls at that batch, so "step / chain" isolates what
dsjax adds on top, while "chain / floor" is XLA's own matmul efficiency (on one CPU core a
one-row matmul runs near the floor and a few-row one, a GEMM, at 2-4x it).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import CausalLM


def median_ms(fn, reps: int = 5) -> float:
    """Median wall time of fn() in ms, after two untimed calls (compilation, warm caches)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure_bandwidth_gbs(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Read bandwidth of the default device, GB/s: one jitted sum over `nbytes` of float32."""
    data = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / (median_ms(lambda: total(data).block_until_ready(), reps) / 1e3) / 1e9


def weight_bytes(params) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def plain_chain(model: CausalLM):
    """jit(params, x [B, E]) -> [B] argmax of the logits, through every weight matrix of `model`
    (q, k, v, o and the MLP per layer, then the LM head) as plain matmuls, nothing else."""
    c = model.config
    e = c.hidden_size

    def chain(params, x):
        for i in range(c.num_layers):
            attn, mlp = params[f"layers_{i}"]["attn"], params[f"layers_{i}"]["mlp"]
            q = x @ attn["q"].reshape(e, -1)
            k = x @ attn["k"].reshape(e, -1)
            v = x @ attn["v"].reshape(e, -1)
            g = q.shape[1] // k.shape[1]  # query heads per KV head: q + k + v stands in for attention
            x = x + (q + jnp.repeat(k + v, g, axis=1)) @ attn["o"].reshape(-1, e)
            if c.arch == "opt":
                x = x + jax.nn.relu(x @ mlp["fc1"]) @ mlp["fc2"]
            else:
                x = x + (jax.nn.silu(x @ mlp["gate"]) * (x @ mlp["up"])) @ mlp["down"]
        if c.tie_embeddings:
            logits = jnp.einsum("te,ve->tv", x, params["embed"]["tokens"])
        else:
            logits = x @ params["lm_head"]["kernel"]
        return jnp.argmax(logits, axis=-1)

    return jax.jit(chain)


def chain_ms(model: CausalLM, params, batch: int, reps: int = 5) -> float:
    fn = plain_chain(model)
    x = jnp.ones((batch, model.config.hidden_size), model.dtype)
    return median_ms(lambda: fn(params, x).block_until_ready(), reps)
