"""The emulated device (dsjax/runtime/emulated.py): step times from the latency model, KV capacity
from the model's bytes, placeholder tokens and KV payloads with the real byte counts."""

import subprocess
import sys
import time

import numpy as np
import pytest

from dsjax.engine.colocated import ColocatedEngine
from dsjax.engine.request import Chunk, Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.planner.latency import LatencyCoeffs, LatencyModel
from dsjax.planner.model_spec import MemoryModel, get_model
from dsjax.runtime.emulated import EmulatedRunner, SlowMotion, emulated_num_blocks
from dsjax.runtime.kv_cache import CacheConfig
from models.config import PRESETS
from serving.kv_transfer import KVAssembler, to_chunks
from tests.support.fake_clock import ManualClock
from tests.support.serving import REPO

OPT13B = PRESETS["opt-13b"]
# DistServe's OPT-13B TP1 fit on A100-80GB (shared/reference/distserve-a100), in ms.
A100_TP1 = LatencyCoeffs(prefill=(18.1, 0.1019, 7.12e-6), decode_small=(19.93, 6.27e-4, 0.0385),
                         decode_large=(7.17, 5.8e-4, 0.158))
BLOCK_BYTES = OPT13B.kv_bytes_per_token(2) * 16  # fp16 K + V of one 16-token block, 40 layers


def runner(pp=1, tp=1, link=None, clock=None, num_blocks=4096, **kw):
    clock = clock or ManualClock()
    lat = LatencyModel(coeffs=A100_TP1, tp=tp, pp=pp)
    return EmulatedRunner(OPT13B, CacheConfig(num_blocks=num_blocks, block_size=16), lat, tp=tp, pp=pp, dtype="float16",
                          link_bytes_per_s=link, clock=clock, sleep=clock.sleep, **kw), lat, clock


def req(rid, prompt_len, out=0, max_tokens=16, **sp):
    return Request(request_id=rid, prompt_token_ids=[5] * prompt_len, output_token_ids=[7] * out, seed=0,
                   sampling=SamplingParams(max_tokens=max_tokens, **sp), eos_token_ids=(2,))


def test_prefill_and_decode_take_the_latency_models_time():
    r, lat, clock = runner()
    t0 = clock()
    tokens = r.prefill([Chunk(req("a", 100), 0, 100), Chunk(req("b", 300), 0, 300)], [[1], [2]])
    assert len(tokens) == 2
    assert clock() - t0 == pytest.approx(lat.prefill_s(400, 100**2 + 300**2, 2, 300))
    reqs = [req("a", 100, out=1), req("b", 300, out=5)]
    t0 = clock()
    r.decode(reqs, [[1], [2]])
    assert clock() - t0 == pytest.approx(lat.decode_step_s(2, 101 + 305, 305))
    assert clock() - t0 == pytest.approx((19.93 + 6.27e-4 * 406 + 0.0385 * 2) * 1e-3)


def test_slow_motion_stretches_every_step_by_its_factor():
    clock = ManualClock()
    lat = LatencyModel(coeffs=A100_TP1, tp=1, pp=2)
    r = EmulatedRunner(OPT13B, CacheConfig(num_blocks=4096, block_size=16), SlowMotion(lat, 3.0), pp=2, dtype="float16",
                       clock=clock, sleep=clock.sleep)
    t0 = clock()
    r.prefill([Chunk(req("a", 300), 0, 300)], [[1]])
    assert clock() - t0 == pytest.approx(3 * lat.prefill_s(300, 300**2, 1, 300))
    t0 = clock()
    r.decode([req("a", 300, out=1)], [[1]])
    assert clock() - t0 == pytest.approx(3 * lat.decode_step_s(1, 301, 301))
    assert SlowMotion(lat, 2.0).mixed_step_s(50, 2500.0, 1, 302.0) == pytest.approx(2 * lat.mixed_step_s(50, 2500.0, 1, 302.0))
    with pytest.raises(ValueError, match="must be > 0"):
        SlowMotion(lat, 0.0)


def test_chunks_after_a_prefix_and_mixed_steps():
    r, lat, clock = runner()
    t0 = clock()
    r.prefill([Chunk(req("a", 300), 100, 300)], [[1]])  # 200 tokens after 100 cached ones
    assert clock() - t0 == pytest.approx(lat.prefill_s(200, 300**2 - 100**2, 1, 300))
    d = req("d", 50, out=3)
    t0 = clock()
    r.prefill([Chunk(d, 52, 53), Chunk(req("p", 64), 0, 64)], [[1], [2]], num_decodes=1)
    assert clock() - t0 == pytest.approx(lat.mixed_step_s(64, 64 * 64, 1, 53, num_chunks=1, chunk_max_keys=64,
                                                          decode_max_keys=53, fused=True))


def test_pipeline_stages_overlap_prefills_and_decode_waits_for_them():
    r, lat, clock = runner(pp=2)
    stage = lat.prefill_stage_s(256, 256**2)
    assert stage == pytest.approx(lat.prefill_ms(256, 256**2) / 2e3 + 2e-3)  # prefill/pp + pp ms
    t0 = clock()
    launched = r.launch_prefill([([Chunk(req(f"r{i}", 256), 0, 256)], [[i]]) for i in range(3)])
    assert [x.ready_at - t0 for x in launched] == pytest.approx([2 * stage, 3 * stage, 4 * stage])
    decode = r.launch_decode([req("d", 10, out=1)], [[9]])  # queued behind every stage's prefill
    assert decode[0].ready_at - t0 == pytest.approx(4 * stage + lat.decode_step_s(1, 11))
    assert clock() == t0  # launching never waits
    r.collect(launched + decode)
    assert clock() - t0 == pytest.approx(4 * stage + lat.decode_step_s(1, 11))


def test_host_time_between_steps_leaves_the_device_idle_and_is_counted():
    r, lat, clock = runner()
    a, b = req("a", 10, out=1), req("b", 20, out=1)
    r.decode([a], [[1]])
    assert (r.continued_steps, r.host_gap_s) == (0, 0.0)  # nothing was waiting to continue
    clock.advance(1.0)  # the engine was late: the next step starts now, not when the last ended
    t0 = clock()
    r.decode([a, b], [[1], [2]])
    assert clock() - t0 == pytest.approx(lat.decode_step_s(2, 11 + 21, 21))
    assert r.continued_steps == 1 and r.host_gap_s == pytest.approx(1.0)  # `a` was ready a second ago
    r.decode([b], [[2]])  # launched the moment the device went free: no gap
    clock.advance(0.25)
    r.decode([req("c", 5, out=1)], [[3]])  # a new batch: the gap before it is idle time, not host time
    assert r.continued_steps == 2 and r.host_gap_s == pytest.approx(1.0)
    clock.advance(0.5)
    r.prefill([Chunk(b, 21, 22), Chunk(req("p", 8), 0, 8)], [[2], [4]], num_decodes=1)
    assert r.continued_steps == 2 and r.host_gap_s == pytest.approx(1.0)  # `c`, not `b`, was in the last step
    clock.advance(0.5)
    r.prefill([Chunk(b, 22, 23)], [[2]], num_decodes=1)  # a mixed step that continues `b`
    assert r.continued_steps == 3 and r.host_gap_s == pytest.approx(1.5)


def decode_run(overlap: bool, host_s: float):
    """Three requests decoded to their ends on one emulated instance, `host_s` of host work after
    every step: (tokens, seconds, host gap counted, lengths of the steps' batches)."""
    from dsjax.engine.disaggregated import DecodeInstance

    r, lat, clock = runner()
    inst = DecodeInstance(r, SchedulerConfig(max_num_seqs=8), overlap=overlap)
    reqs = [req(f"r{i}", 10 + i, out=1, max_tokens=n) for i, n in enumerate((3, 6, 5))]
    for q in reqs:
        inst.blocks.allocate(q.request_id, q.num_tokens - 1)
        inst.running.append(q)
    sizes = []
    r.launch_hook = lambda kind, ctx: sizes.append(len(ctx))
    t0 = clock()
    while inst.busy():
        inst.step()
        clock.advance(host_s)
    assert inst.blocks.num_free_blocks == inst.blocks.capacity_blocks
    return [q.output_token_ids for q in reqs], clock() - t0, r.host_gap_s, sizes


def test_an_overlapped_decode_hides_host_time_and_changes_no_token():
    tokens, serial, gap, sizes = decode_run(overlap=False, host_s=0.004)
    assert sizes == [3, 3, 2, 2, 1] and gap == pytest.approx(4 * 0.004)  # every step waited for the host
    tokens_o, overlapped, gap_o, sizes_o = decode_run(overlap=True, host_s=0.004)
    assert tokens_o == tokens and [len(t) for t in tokens] == [3, 6, 5]
    assert sizes_o == sizes  # a request ending by length sits out the step after its last
    assert gap_o == 0.0  # each step was queued before the device went free
    step = 0.0201  # the steps take ~20 ms each (the A100 fit); the host's 4 ms per step is hidden
    assert serial - overlapped == pytest.approx(4 * 0.004, abs=1e-9)
    assert overlapped == pytest.approx(5 * step + 0.004, rel=0.01)


def test_an_overlapped_colocated_engine_makes_a_new_prompt_wait_for_the_queued_step():
    """Why colocated engines run decode steps one at a time by default: overlapped, a prompt that
    arrives while a decode step runs also waits for the step already queued behind it."""
    waits = {}
    for overlap in (False, True):
        r, lat, clock = runner()
        engine = ColocatedEngine(r, SchedulerConfig(max_num_seqs=8), overlap=overlap)
        assert engine.overlap == overlap
        running = req("a", 100, max_tokens=50)
        engine.add_request(running)
        while len(running.output_token_ids) < 5:
            engine.step()
        arrived, new = clock(), req("b", 100, max_tokens=5)
        engine.add_request(new)
        while not new.output_token_ids:
            engine.step()
        waits[overlap] = clock() - arrived
    prefill, step = lat.prefill_s(100, 100**2, 1, 100), lat.decode_step_s(1, 106)
    assert waits[False] == pytest.approx(prefill)  # it arrived as a step ended: only its prefill
    assert waits[True] == pytest.approx(step + prefill, rel=1e-4)  # and the decode step queued before it
    assert not ColocatedEngine(r, SchedulerConfig()).overlap  # the default


def test_a_prompt_batch_launched_after_its_request_was_ready_counts_host_time():
    r, lat, clock = runner(pp=2)
    late = req("late", 64)
    late.lifecycle.arrival = time.perf_counter() - 0.3  # waited 0.3 s on an idle device
    first = r.launch_prefill([([Chunk(late, 0, 64)], [[1]])])
    assert r.prefill_launches == 1 and r.prefill_host_gap_s == pytest.approx(0.3, abs=0.01)
    queued = req("queued", 64)
    queued.lifecycle.arrival = time.perf_counter() - 5.0
    r.launch_prefill([([Chunk(queued, 0, 64)], [[2]])])  # the first stage is still busy: nothing lost
    assert r.prefill_launches == 2 and r.prefill_host_gap_s == pytest.approx(0.3, abs=0.01)
    r.collect(first)
    clock.advance(0.2)
    fresh = req("fresh", 64)  # arrived 0.1 s ago, after the first stage went free
    fresh.lifecycle.arrival = time.perf_counter() - 0.1
    r.launch_prefill([([Chunk(fresh, 0, 64)], [[3]])])
    assert r.prefill_launches == 3 and r.prefill_host_gap_s == pytest.approx(0.4, abs=0.01)
    assert r.continued_steps == 0


def test_real_sleep_matches_the_model():
    r, lat, _ = runner(clock=None)
    r._clock, r._sleep = time.monotonic, time.sleep
    reqs = [req(f"r{i}", 500, out=1) for i in range(8)]
    expect = lat.decode_step_s(8, 8 * 501)
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        r.decode(reqs, [[1]] * 8)
        took.append(time.monotonic() - t0)
    assert expect <= min(took) < expect * 1.25 + 0.003  # the best of three: a busy host oversleeps


def test_kv_capacity_follows_the_models_bytes_and_the_planners_memory_model():
    for name, tps in (("opt-13b", (1, 2, 4)), ("opt-66b", (2, 4, 8))):
        spec, cfg = MemoryModel(model=get_model(name)), PRESETS[name]
        for tp in tps:
            for pp in (1, 2):
                blocks = emulated_num_blocks(cfg, tp=tp, pp=pp, block_size=16, dtype_bytes=2)
                # the same arithmetic; the planner's parameter counts are rounded (65.7e9 for 65.71e9)
                assert blocks == pytest.approx(spec.estimate_tokens(tp, pp) // 16 + 1, rel=2e-3, abs=1)
    # OPT-13B TP1 on 80 GiB: 0.92 x 80 GiB - 25.7 GB of weights = 53.3 GB of KV at 800 KiB a token
    blocks = emulated_num_blocks(OPT13B, tp=1, pp=1, block_size=16, dtype_bytes=2)
    weights = OPT13B.num_params() * 2
    assert (blocks - 1) * BLOCK_BYTES <= 0.92 * 80 * 2**30 - weights < blocks * BLOCK_BYTES
    assert 4000 < blocks < 4100
    assert emulated_num_blocks(OPT13B, tp=1, pp=1, block_size=16, dtype_bytes=2, memory_bytes=40 * 2**30) < blocks / 2
    with pytest.raises(ValueError, match="leave no KV room"):
        emulated_num_blocks(PRESETS["opt-66b"], tp=1, pp=1, block_size=16, dtype_bytes=2)


def test_tokens_are_deterministic_placeholders_that_never_end_a_request_early():
    r, _, _ = runner()
    a = req("x", 4)
    toks = [r.token(a, p) for p in range(4, 200)]
    assert toks == [r.token(a, p) for p in range(4, 200)] and len(set(toks)) > 150
    assert all(0 <= t < OPT13B.vocab_size for t in toks)
    banned = req("x", 4, stop_token_ids=toks[:5])
    banned.eos_token_ids = tuple(toks[5:10])
    assert not set(r.token(banned, p) for p in range(4, 200)) & set(toks[:10])
    engine = ColocatedEngine(runner(num_blocks=64)[0], SchedulerConfig(max_num_seqs=4, max_prefill_tokens=512))
    reqs = [req(f"q{i}", 20 + i, max_tokens=3 + i) for i in range(6)]
    for q in reqs:
        engine.add_request(q)
    while engine.has_unfinished():
        engine.step()
    assert [len(q.output_token_ids) for q in reqs] == [3, 4, 5, 6, 7, 8]
    assert all(q.finish_reason.value == "length" for q in reqs)


def test_in_process_kv_moves_take_bytes_over_bandwidth():
    src, _, clock = runner(tp=2, link=25e9 / 8)
    dst, _, _ = runner(link=25e9 / 8, clock=clock)
    t0 = clock()
    assert dst.pull_kv(src, [3, 4, 5], [7, 8, 9]) == 3 * BLOCK_BYTES
    assert clock() - t0 == pytest.approx(3 * BLOCK_BYTES / (25e9 / 8))
    t0 = clock()
    staged = src.stage_kv([1, 2])
    assert dst.insert_kv([5, 6], staged, wait=False) == 2 * BLOCK_BYTES and clock() == t0
    out = dst.launch_decode([req("a", 20, out=1)], [[5, 6]])  # ordered after the insert
    assert out[0].ready_at - t0 == pytest.approx(2 * BLOCK_BYTES / (25e9 / 8) + dst.decode_step_s([21]))
    assert dst.bytes_moved == 5 * BLOCK_BYTES
    free, _, _ = runner()
    assert free.transfer_s(100) == 0.0  # no link given: transfers are free


def test_wire_path_carries_a_placeholder_and_counts_the_real_bytes():
    src, _, clock = runner(link=100e9 / 8)
    dst, _, _ = runner(clock=clock)
    d = src.kv_descriptor(37)  # 3 blocks of 16
    assert (d.num_layers, d.num_kv_heads, d.head_dim, d.dtype, d.num_blocks) == (1, 1, 1, "uint8", 3)
    assert src.kv_bytes(37) == 3 * BLOCK_BYTES and d.nbytes == 2 * 3 * 16
    t0 = clock()
    k, v = src.kv_to_host(src.stage_kv([4, 5, 6]))
    assert clock() - t0 == pytest.approx(3 * BLOCK_BYTES / (100e9 / 8))
    asm = KVAssembler(d)
    for chunk in to_chunks(d, k, v):
        asm.add(chunk)
    assert asm.bytes == 96  # what crossed the wire
    assert dst.import_kv([1, 2, 3], *asm.arrays(block_size=16)) == 3 * BLOCK_BYTES
    with pytest.raises(ValueError, match="does not fit"):
        dst.import_kv([1, 2], k, v)


def test_the_emulated_worker_path_loads_no_jax():
    code = ("import sys; from models.config import PRESETS; from dsjax.planner.latency import LatencyCoeffs, LatencyModel; "
            "from dsjax.runtime.emulated import EmulatedRunner; from dsjax.runtime.kv_cache import CacheConfig; "
            "import dsjax.emulate, serving.worker, serving.prefill_worker, serving.decode_worker, serving.launcher; "
            "c = LatencyCoeffs(prefill=(1, 0, 0), decode_small=(1, 0, 0), decode_large=(1, 0, 0)); "
            "EmulatedRunner(PRESETS['opt-13b'], CacheConfig(), LatencyModel(coeffs=c)).decode([], []); "
            "print(sorted(m for m in ('jax', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_devices_and_stats_look_like_a_runner():
    r, _, _ = runner(tp=2, pp=2, devices=[4, 5, 6, 7])
    assert [d.id for d in r.devices()] == [4, 5, 6, 7] and r.devices()[0].platform == "emulated"
    assert len(r.devices()) // r.pp == 2 and r.block_size == 16 and r.attention_backend == "emulated"
    calls = []
    r.launch_hook = lambda kind, shapes: calls.append((kind, shapes))
    r.prefill([Chunk(req("a", 8), 0, 8)], [[1]])
    r.decode([req("a", 8, out=1)], [[1]])
    assert calls == [("prefill", [(0, 8)]), ("decode", [8])]
    assert np.asarray(r.decode([], [])).size == 0
    with pytest.raises(ValueError, match="device ids"):
        runner(tp=2, devices=[1])
