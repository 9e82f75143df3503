"""Shape warm-up (dsjax/runtime/warmup.py): after it, requests within the scheduler's limits compile
nothing new, and the padding-only batches leave the real KV blocks untouched."""

import jax
import numpy as np
import pytest

from dsjax.engine.colocated import ColocatedEngine
from dsjax.engine.request import Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.runner import ModelRunner, feed_tokens
from dsjax.runtime.warmup import decode_shapes, prefill_shapes, warm_runner, warm_shapes


def test_shape_lists_follow_the_limits():
    pre = prefill_shapes(max_prefill_tokens=48, max_prefill_seqs=2, max_context=128, block_size=16)
    assert (16, 1, 1) in pre and (64, 2, 4) in pre and (128, 1, 8) in pre
    assert all(b <= 2 and mb <= max(1, t // 16) for t, b, mb in pre)
    assert (64, 2, 8) not in pre and (64, 2, 8) in prefill_shapes(
        max_prefill_tokens=48, max_prefill_seqs=2, max_context=128, block_size=16, prefix=True)
    assert decode_shapes(max_num_seqs=3, max_context=40, block_size=16) == [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4)]
    # the XLA path's floor: one table width past the context (its loop follows the real lengths)
    assert decode_shapes(max_num_seqs=3, max_context=40, block_size=16, min_blocks=8) == [(1, 8), (2, 8), (4, 8)]


def test_no_compilation_after_warmup(tiny_llama):
    model, params = tiny_llama
    # the context a request can reach here: its prompt plus 8 tokens (--max-model-len 64)
    sched = SchedulerConfig(max_num_seqs=4, max_prefill_tokens=32, max_prefill_seqs=4, max_model_len=64)
    runner = ModelRunner(model, params, CacheConfig(num_blocks=64, block_size=8))
    # a real block with known contents must survive the padding-only batches
    stage = runner.stages[0]
    marker = jax.numpy.full(stage.cache.k[0][5].shape, 7.0, stage.cache.k[0].dtype)
    stage.cache = type(stage.cache)(k=tuple(k.at[5].set(marker) for k in stage.cache.k), v=stage.cache.v)
    assert runner.decode_min_blocks == 1 << (-(-model.config.max_position // 8) - 1).bit_length()
    logged = []
    warm_runner(runner, sched, log=logged.append)
    pre = prefill_shapes(max_prefill_tokens=32, max_prefill_seqs=4, max_context=64, block_size=8)
    # decode: batch buckets 1, 2, 4 at one table width (the serving below must compile nothing)
    assert logged and logged[0].startswith(f"warmed {len(pre)} prefill and 3 decode shapes")
    np.testing.assert_array_equal(np.asarray(stage.cache.k[0][5]), np.asarray(marker))
    sizes = (stage.prefill_fn._cache_size(), stage.decode_fn._cache_size(), feed_tokens._cache_size())
    engine = ColocatedEngine(runner, sched, overlap=True)  # overlapped decode steps: the token feeds are warm too
    rng = np.random.default_rng(3)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reqs = [Request(request_id=f"r{i}", prompt_token_ids=[int(x) for x in rng.integers(0, 500, n)], sampling=sp, seed=0)
            for i, n in enumerate((3, 17, 30, 45, 9, 33))]
    for r in reqs:
        engine.add_request(r)
    for _ in range(200):
        if not engine.has_unfinished():
            break
        engine.step()
    assert all(len(r.output_token_ids) == 8 for r in reqs)
    assert (stage.prefill_fn._cache_size(), stage.decode_fn._cache_size(), feed_tokens._cache_size()) == sizes


class _OrderRecorder:
    """A runner stand-in that records the order warm_shapes dispatches its shapes in."""
    pp = 2  # no token feeds to warm
    fresh_prefill = False

    def __init__(self):
        self.seen = []

    def _dispatch(self, packed, decode):
        tokens, meta, _ = packed
        self.seen.append(("decode" if decode else "prefill", len(tokens), *meta.block_tables.shape))
        return np.zeros(len(tokens), np.int32)


def test_replicas_sharing_the_warmup_start_on_disjoint_parts():
    """Replica i of n starts at shape i * total / n and wraps: every replica warms every shape once,
    and at the start the n replicas compile different programs (the rest come from the cache)."""
    pre = prefill_shapes(max_prefill_tokens=32, max_prefill_seqs=2, max_context=64, block_size=8)
    dec = decode_shapes(max_num_seqs=4, max_context=64, block_size=8)
    orders = []
    for i in range(3):
        r = _OrderRecorder()
        warm_shapes(r, prefill=pre, decode=dec, share=(i, 3))
        orders.append(r.seen)
    total = len(pre) + len(dec)
    assert all(len(o) == total and sorted(o) == sorted(orders[0]) for o in orders)
    third = total // 3
    firsts = [set(o[:third]) for o in orders]
    assert not (firsts[0] & firsts[1]) and not (firsts[1] & firsts[2]) and not (firsts[0] & firsts[2])
    assert orders[1][:total - third] == orders[0][third:]  # the same list, rotated
    with pytest.raises(ValueError, match="share"):
        warm_shapes(_OrderRecorder(), prefill=pre, decode=dec, share=(2, 2))
