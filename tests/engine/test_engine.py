"""The single-instance engine against a dense (recompute-everything) greedy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.engine.colocated import ColocatedEngine
from dsjax.engine.request import FinishReason, Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.runner import ModelRunner
from tests.support.dense import prompt_logits

PROMPT_LENS = (1, 5, 7, 8, 9, 17)  # block size 8: lengths at and around block boundaries


DENSE_LEN = 64


def dense_greedy(model, params, prompt, n):
    """Greedy decoding by recomputing the whole sequence each token. Causality lets every call
    use one padded length (positions past the sequence cannot influence it): one compilation."""
    logits_fn = jax.jit(functools.partial(prompt_logits, model))
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.zeros(DENSE_LEN, jnp.int32).at[: len(seq)].set(jnp.array(seq, jnp.int32))
        seq.append(int(jnp.argmax(logits_fn(params, padded)[len(seq) - 1])))
    return seq[len(prompt):]


def make_requests(prompts, max_tokens, **kw):
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)
    return [Request(request_id=f"r{i}", prompt_token_ids=p, sampling=sp, seed=0) for i, p in enumerate(prompts)]


def run(engine, reqs):
    for r in reqs:
        engine.add_request(r)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert steps < 500
    return steps


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [[int(x) for x in rng.integers(0, 500, n)] for n in PROMPT_LENS]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_greedy_matches_dense_reference(fixture, prompts, request):
    model, params = request.getfixturevalue(fixture)
    engine = ColocatedEngine(ModelRunner(model, params, CacheConfig(num_blocks=64, block_size=8)), SchedulerConfig(max_num_seqs=4, max_prefill_tokens=32))
    start_free = engine.blocks.num_free_blocks
    reqs = make_requests(prompts, 10)
    run(engine, reqs)
    for r, p in zip(reqs, prompts):
        assert r.finish_reason is FinishReason.LENGTH
        assert r.output_token_ids == dense_greedy(model, params, p, 10), r.request_id
    assert engine.blocks.num_free_blocks == start_free
    engine.blocks.check_invariants()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "one-at-a-time"])
def test_preemption_under_small_pool_still_exact(tiny_llama, prompts, overlap):
    """A pool too small for all requests forces recompute-preemption; outputs must not change,
    with decode steps overlapped (dispatched behind the one in flight, some of whose requests
    are preempted meanwhile) or one at a time."""
    model, params = tiny_llama
    engine = ColocatedEngine(ModelRunner(model, params, CacheConfig(num_blocks=9, block_size=8)), SchedulerConfig(max_num_seqs=6, max_prefill_tokens=64),
                             overlap=overlap)
    launch, fed = engine.runner.launch_decode, []

    def spy(reqs, tables, after=None):
        fed.append(after is not None)
        return launch(reqs, tables, after=after)

    engine.runner.launch_decode = spy
    reqs = make_requests(prompts, 10)
    run(engine, reqs)
    assert any(fed) == overlap and engine.inflight is None
    assert sum(r.lifecycle.num_preemptions for r in reqs) > 0, "pool was meant to force preemption"
    for r, p in zip(reqs, prompts):
        assert r.output_token_ids == dense_greedy(model, params, p, 10)
    assert engine.blocks.num_free_blocks == 8
    engine.blocks.check_invariants()


def test_abort_and_stop_tokens_free_blocks(tiny_llama, prompts):
    model, params = tiny_llama
    engine = ColocatedEngine(ModelRunner(model, params, CacheConfig(num_blocks=32, block_size=8)), SchedulerConfig(max_num_seqs=4))
    reqs = make_requests(prompts[:3], 20)
    for r in reqs:
        engine.add_request(r)
    engine.step()
    engine.step()
    assert engine.abort("r1")
    assert not engine.abort("r1")
    while engine.has_unfinished():
        engine.step()
    assert reqs[1].finish_reason is FinishReason.CANCELLED
    assert engine.blocks.num_free_blocks == 31
    # A stop token ends generation at the first occurrence of that id.
    expected = reqs[0].output_token_ids
    stop_req = make_requests([prompts[0]], 20, stop_token_ids=(expected[3],))[0]
    stop_req.request_id = "stop"
    run(engine, [stop_req])
    assert stop_req.finish_reason is FinishReason.STOP
    assert stop_req.output_token_ids == expected[: expected.index(expected[3]) + 1]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-programs"])
def test_chunked_prefill_matches_prefill_first(tiny_llama, prompts, monkeypatch, fused):
    """Chunked steps (fused: decodes split from prompt chunks in one prefill call; two programs:
    the decode program then the prefill program in the same step; decode-only steps on the decode
    program) generate the prefill-first engine's greedy tokens."""
    import dsjax.runtime.runner

    model, params = tiny_llama
    cache = CacheConfig(num_blocks=64, block_size=8)
    reference = make_requests(prompts, 8)
    run(ColocatedEngine(ModelRunner(model, params, cache), SchedulerConfig(max_num_seqs=4, max_prefill_tokens=32)), reference)

    decode_rows, decode_steps = [], []  # num_decode_rows of every prefill call; decode batch sizes
    real_pack, real_pack_decode = dsjax.runtime.runner.pack_prefill, dsjax.runtime.runner.pack_decode
    runner = ModelRunner(model, params, cache)

    def pack_spy(*args, **kwargs):
        packed = real_pack(*args, **kwargs)
        decode_rows.append(packed[1].num_decode_rows)
        return packed

    def pack_decode_spy(reqs, *args):
        decode_steps.append(len(reqs))
        return real_pack_decode(reqs, *args)

    collected = []  # programs whose outputs one step waits for together

    def collect_spy(launched):
        collected.append(len(launched))
        return ModelRunner.collect(launched)

    monkeypatch.setattr(dsjax.runtime.runner, "pack_prefill", pack_spy)
    monkeypatch.setattr(dsjax.runtime.runner, "pack_decode", pack_decode_spy)
    monkeypatch.setattr(runner, "collect", collect_spy)
    engine = ColocatedEngine(runner, SchedulerConfig(max_num_seqs=4, max_prefill_tokens=12), chunked=True, fused_mixed_steps=fused)
    reqs = make_requests(prompts, 8)
    run(engine, reqs)
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in reference]
    if fused:
        assert sum(n > 0 for n in decode_rows) >= 3, decode_rows  # mixed steps took the split layout
        assert max(collected) == 1
    else:  # mixed steps launched the decode program and the prefill program together
        assert sum(n == 2 for n in collected) >= 3, collected
    assert decode_steps, decode_steps  # steps without a prompt chunk ran the decode program
    assert engine.blocks.num_free_blocks == 63
    engine.blocks.check_invariants()
