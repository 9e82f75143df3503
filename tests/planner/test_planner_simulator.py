import math

import numpy as np
import pytest

from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.planner.latency import LatencyCoeffs, LatencyModel, Profile
from dsjax.planner.model_spec import MemoryModel, get_model
from dsjax.planner.running_batch import RunningBatch
from dsjax.planner.simulator import SimConfig, Simulator, md1_mean_ttft
from dsjax.planner.slo import SLO
from dsjax.workloads.trace_gen import FixedLengths, Trace, generate_trace

COEFFS = LatencyCoeffs(prefill=(18.1, 0.1019, 7.12e-6), decode_small=(19.93, 6.27e-4, 0.0385), decode_large=(7.17, 5.8e-4, 0.158))
PROFILE = Profile(entries={"facebook/opt-13b": {1: COEFFS, 2: COEFFS}})
MODEL = get_model("opt-13b")
BIG = MemoryModel(model=MODEL, table={"facebook/opt-13b": {(tp, pp): 10**7 for tp in (1, 2) for pp in (1, 2, 4)}})
SLO_ = SLO(ttft_s=1.0, tpot_s=0.1)


def _sim(placement, memory=BIG, **cfg):
    return Simulator(placement=placement, profile=PROFILE, model=MODEL, memory=memory, config=SimConfig(**cfg))


def _trace(rows):
    a, p, o = zip(*rows)
    return Trace(arrival_s=np.array(a, float), prompt_len=np.array(p), output_len=np.array(o))


def _disagg(tp=1, pp=1, n=1, dtp=1, dpp=1, m=1):
    return Placement(prefill=PhaseParallel(tp=tp, pp=pp, replicas=n), decode=PhaseParallel(tp=dtp, pp=dpp, replicas=m))


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.65, 0.8])
def test_prefill_queue_matches_md1(rho):
    """One prefill instance, one request per batch (L_m = prompt length), fixed prompts, Poisson."""
    lat = LatencyModel(coeffs=COEFFS)
    service = lat.prefill_s(512, 512**2)
    rate = rho / service
    trace = generate_trace(num_requests=30000, rate=rate, lengths=FixedLengths(prompt_len=512, output_len=1), seed=3)
    result = _sim(_disagg(), prefill_token_budget=512).run(trace, slo=SLO_, phase="prefill")
    assert result.ttft_s.mean() == pytest.approx(md1_mean_ttft(service, trace.mean_rate), rel=0.05)


def test_single_request_latencies_are_exact():
    trace = _trace([(0.0, 512, 11)])
    r = _sim(_disagg()).run(trace, slo=SLO_)
    prefill = COEFFS.prefill_ms(512, 512**2) * 1e-3
    steps = [COEFFS.decode_ms(1, 513 + j) * 1e-3 for j in range(10)]
    assert r.ttft_s[0] == pytest.approx(prefill)
    assert r.tpot_s[0] == pytest.approx(sum(steps) / 10)
    assert r.attainment == 1.0


def _reference_decode(trace, latency, max_batch):
    """Naive per-step continuous batching of one decode instance (requests arrive prefilled)."""
    n = len(trace)
    arrival, prompt, out = trace.arrival_s, trace.prompt_len, trace.output_len
    finish = np.full(n, math.inf)
    t, nxt = 0.0, 0
    running: dict[int, int] = {}  # rid -> tokens generated so far (first one by prefill)
    waiting: list[int] = []
    while nxt < n or running or waiting:
        while nxt < n and arrival[nxt] <= t:
            if out[nxt] == 1:
                finish[nxt] = arrival[nxt]
            else:
                waiting.append(nxt)
            nxt += 1
        while waiting and len(running) < max_batch:
            running[waiting.pop(0)] = 1
        if not running:
            t = arrival[nxt]
            continue
        ctx = [prompt[r] + g for r, g in running.items()]  # ctx + 1 of each running request
        t += latency.decode_step_s(len(running), sum(ctx), max(ctx))
        for r in list(running):
            running[r] += 1
            if running[r] == out[r]:
                finish[r] = t
                del running[r]
    return finish


@pytest.mark.parametrize("buckets", [None, "padded", "ragged"])
@pytest.mark.parametrize("pp,max_batch", [(1, 256), (1, 3), (2, 256)])
def test_decode_skip_ahead_matches_per_step_reference(pp, max_batch, buckets):
    rng = np.random.default_rng(pp + max_batch)
    trace = generate_trace(num_requests=60, rate=20.0, lengths=FixedLengths(prompt_len=1, output_len=1), seed=1)
    trace = Trace(arrival_s=trace.arrival_s, prompt_len=rng.integers(1, 800, 60), output_len=rng.integers(1, 60, 60))
    sim = _sim(_disagg(dpp=pp), decode_max_batch_size=max_batch)
    if buckets is not None:
        profile = Profile(entries=PROFILE.entries, metadata={"shape_buckets": {"block_size": 16, "attention": buckets}})
        sim = Simulator(placement=sim.placement, profile=profile, model=MODEL, memory=BIG, config=sim.config)
        assert sim.decode.latency.buckets is not None
    r = sim.run(trace, slo=SLO_, phase="decode")
    finish = _reference_decode(trace, sim.decode.latency, max_batch)
    mask = trace.output_len > 1
    expected = (finish - trace.arrival_s)[mask] / (trace.output_len[mask] - 1)
    np.testing.assert_allclose(r.tpot_s[mask], expected, rtol=1e-9)


def test_running_batch_time_math():
    lat = LatencyModel(coeffs=COEFFS)
    b = RunningBatch(lat)
    b.join(0, context_len=100, steps=3)
    b.join(1, context_len=300, steps=1)
    assert b.sum_ctx == 402
    b.start_segment(1.0)
    assert b.time_after(2) == pytest.approx(1.0 + lat.decode_step_s(2, 402) + lat.decode_step_s(2, 404))
    for t in (1.0, 1.01, 1.05, 1.3):
        k = b.steps_until(t)
        assert b.time_after(k) >= t and (k == 1 or b.time_after(k - 1) < t)
    assert b.advance(1) == [1]
    assert b.sum_ctx == 102


def test_pipelined_prefill_overlaps_batches():
    # Two long prompts arriving together: with pp=2 the second enters stage 0 when the first leaves it.
    trace = _trace([(0.0, 1500, 1), (0.0, 1500, 1)])
    r1 = _sim(_disagg(pp=1), prefill_token_budget=1500).run(trace, slo=SLO_, phase="prefill")
    r2 = _sim(_disagg(pp=2), prefill_token_budget=1500).run(trace, slo=SLO_, phase="prefill")
    lat2 = LatencyModel(coeffs=COEFFS, pp=2)
    stage = lat2.prefill_stage_s(1500, 1500**2)
    np.testing.assert_allclose(r2.ttft_s, [2 * stage, 3 * stage])
    assert r2.ttft_s[1] < r1.ttft_s[1]


def test_prefill_batches_short_prompts():
    trace = _trace([(0.0, 2000, 1)] + [(0.001, 100, 1)] * 5)
    r = _sim(_disagg(), prefill_token_budget=512).run(trace, slo=SLO_, phase="prefill")
    first = COEFFS.prefill_ms(2000, 2000**2) * 1e-3
    batch = COEFFS.prefill_ms(500, 5 * 100**2) * 1e-3
    np.testing.assert_allclose(r.ttft_s[1:], first + batch - 0.001)


def test_kv_capacity_limits_preempts_and_recomputes():
    """A 1,000-token decode pool takes both 400-token requests (the second's context and a growth
    block fit beside the first, as the engine's can_pull asks; it joins one step later), runs out
    of KV after 100 steps (the step would need 1,001 + 2 tokens), preempts the newer one, which is
    prefilled again over its 500 tokens and pulled once the older one has finished; the
    2,000-token prompt never fits and stays unserved."""
    small = MemoryModel(model=MODEL, table={"facebook/opt-13b": {(1, 1): 1000}})
    # a one-token request first keeps the prefill instance busy while the two queue up as one batch
    trace = _trace([(0.0, 100, 1), (0.0, 400, 200), (0.0, 400, 200), (0.0, 2000, 10)])
    r = _sim(_disagg(), memory=small, prefill_token_budget=1024).run(trace, slo=SLO_)
    assert np.isinf(r.ttft_s[3]) and r.summary()["num_unserved"] == 1
    ms = 1e-3
    prefill = (COEFFS.prefill_ms(100, 100**2) + COEFFS.prefill_ms(800, 2 * 400**2)) * ms
    t1 = prefill + (COEFFS.decode_ms(1, 401) + sum(COEFFS.decode_ms(2, 803 + 2 * j) for j in range(99))) * ms  # preemption
    t2 = t1 + sum(COEFFS.decode_ms(1, 501 + i) for i in range(99)) * ms  # the older one finishes
    finish_1 = t2 + sum(COEFFS.decode_ms(1, 501 + i) for i in range(99)) * ms  # 99 tokens after the recompute's
    assert r.ttft_s[1:] == pytest.approx([prefill, prefill, math.inf])
    assert r.tpot_s[1] == pytest.approx((t2 - prefill) / 199)
    assert r.tpot_s[2] == pytest.approx((finish_1 - prefill) / 199)
    unlimited = _sim(_disagg(), memory=small, kv_capacity_limit=False).run(trace, slo=SLO_)
    assert np.isfinite(unlimited.ttft_s).all()


def test_decode_only_runs_preempt_and_finish_every_request():
    """Algorithm 1's decode-only simulation: a preempted request is pulled again (its recompute is
    free there) and still produces all its tokens; with room for both nothing is preempted."""
    small = MemoryModel(model=MODEL, table={"facebook/opt-13b": {(1, 1): 1000}})
    trace = _trace([(0.0, 400, 200), (0.001, 400, 200)])
    tight = _sim(_disagg(), memory=small).run(trace, slo=SLO_, phase="decode")
    roomy = _sim(_disagg()).run(trace, slo=SLO_, phase="decode")
    assert np.isfinite(tight.tpot_s).all() and tight.summary()["num_unserved"] == 0
    assert tight.tpot_s[1] > 1.3 * roomy.tpot_s[1]  # it waited for the first to finish


def test_colocated_kv_limit_preempts_the_newest_and_recomputes_it():
    """The engine's colocated rule: both prompts are admitted (their prompts fit), decoding runs out
    of KV after 100 steps, the newer request goes back to the queue's front and is prefilled again
    over its 501 tokens once the older one has finished and freed its KV."""
    small = MemoryModel(model=MODEL, table={"facebook/opt-13b": {(1, 1): 1000}})
    # a one-token request first keeps the instance busy while the two queue up as one batch
    trace = _trace([(0.0, 100, 1), (0.0, 400, 200), (0.0, 400, 200)])
    chunked = _sim(Placement.colocated(tp=1, mode="chunked"), memory=small, chunk_tokens=1024).run(trace, slo=SLO_)
    assert np.isfinite(chunked.tpot_s[1:]).all() and chunked.tpot_s[2] > 1.3 * chunked.tpot_s[1]
    r = _sim(Placement.colocated(tp=1), memory=small).run(trace, slo=SLO_)
    ms = 1e-3
    prefill = (COEFFS.prefill_ms(100, 100**2) + COEFFS.prefill_ms(800, 2 * 400**2)) * ms
    t1 = prefill + sum(COEFFS.decode_ms(2, 802 + 2 * j) for j in range(100)) * ms  # the preemption
    t2 = t1 + sum(COEFFS.decode_ms(1, 501 + i) for i in range(99)) * ms  # the older one finishes
    recompute = COEFFS.prefill_ms(501, 501**2) * ms
    finish_1 = t2 + recompute + sum(COEFFS.decode_ms(1, 502 + i) for i in range(98)) * ms
    assert r.ttft_s[1:] == pytest.approx([prefill, prefill])
    assert r.tpot_s[1] == pytest.approx((t2 - prefill) / 199)
    assert r.tpot_s[2] == pytest.approx((finish_1 - prefill) / 199)


def test_kv_transfer_time():
    trace = _trace([(0.0, 1000, 5)])
    free = _sim(_disagg()).run(trace, slo=SLO_)
    slow = _sim(_disagg(), link_bytes_per_s=25e9 / 8).run(trace, slo=SLO_)
    expected = 1000 * MODEL.kv_bytes_per_token / (25e9 / 8) / 4  # spread over 4 decode steps
    assert slow.tpot_s[0] - free.tpot_s[0] == pytest.approx(expected, rel=0.2)
    fixed = _sim(_disagg(), link_bytes_per_s=25e9 / 8, transfer_fixed_s=0.02).run(trace, slo=SLO_)
    assert fixed.tpot_s[0] - slow.tpot_s[0] == pytest.approx(0.02 / 4, rel=1e-6)
    assert fixed.ttft_s[0] == free.ttft_s[0]  # the transfer follows the first token


def test_decode_join_cost_delays_the_whole_batch():
    """Landing a joiner's KV costs the decode instance `decode_join_s` before its next step: the
    joiner's own TPOT grows by join/(n-1), and a request already decoding loses the same time once."""
    alone = _trace([(0.0, 512, 11)])
    free = _sim(_disagg()).run(alone, slo=SLO_)
    joined = _sim(_disagg(), decode_join_s=0.01).run(alone, slo=SLO_)
    assert joined.tpot_s[0] - free.tpot_s[0] == pytest.approx(0.01 / 10, rel=1e-6)
    assert joined.ttft_s[0] == free.ttft_s[0]
    # a second request joins while the first decodes (prefill of 64 tokens ends mid-decode)
    two = _trace([(0.0, 512, 200), (0.3, 64, 5)])
    free2 = _sim(_disagg()).run(two, slo=SLO_)
    cost2 = _sim(_disagg(), decode_join_s=0.01).run(two, slo=SLO_)
    first_extra = (cost2.tpot_s[0] - free2.tpot_s[0]) * 199
    assert first_extra == pytest.approx(0.02, rel=0.05)  # its own landing and the second's
    with pytest.raises(ValueError, match="decode_join_s"):
        SimConfig(decode_join_s=-1.0)


@pytest.mark.parametrize("placement", [_disagg(), Placement.colocated(tp=1), Placement.colocated(tp=1, mode="chunked")],
                         ids=["disaggregated", "colocated", "chunked"])
def test_decode_host_time_adds_to_every_decode_step(placement):
    """`decode_host_s`: the engine's host time before each decode step (and each mixed step that
    carries decodes), as an emulated run measures it: 10 steps of one request cost 10 of it more."""
    alone = _trace([(0.0, 512, 11)])
    free = _sim(placement, chunk_tokens=4096).run(alone, slo=SLO_)
    host = _sim(placement, chunk_tokens=4096, decode_host_s=0.004).run(alone, slo=SLO_)
    assert host.ttft_s[0] == free.ttft_s[0]
    assert host.tpot_s[0] - free.tpot_s[0] == pytest.approx(0.004, rel=1e-6)
    # a prompt arriving mid-decode: with chunked prefill it shares a mixed step, which pays it too
    two = _trace([(0.0, 512, 11), (0.1, 64, 2)])
    free2 = _sim(placement, chunk_tokens=4096).run(two, slo=SLO_)
    host2 = _sim(placement, chunk_tokens=4096, decode_host_s=0.004).run(two, slo=SLO_)
    assert host2.tpot_s[0] - free2.tpot_s[0] == pytest.approx(0.004, rel=1e-3)
    with pytest.raises(ValueError, match="decode_host_s"):
        SimConfig(decode_host_s=-0.001)


@pytest.mark.parametrize("placement", [_disagg(), _disagg(pp=2), Placement.colocated(tp=1),
                                       Placement.colocated(tp=1, mode="chunked")],
                         ids=["disaggregated", "prefill-pp2", "colocated", "chunked"])
def test_prefill_host_time_delays_every_prompt_batch(placement):
    """`prefill_host_s`: the engine's host time before each prompt batch reaches the device: one
    request's TTFT grows by it; two prompts that cannot share a batch, by it twice for the second."""
    alone = _trace([(0.0, 512, 11)])
    free = _sim(placement, chunk_tokens=4096).run(alone, slo=SLO_)
    host = _sim(placement, chunk_tokens=4096, prefill_host_s=0.003).run(alone, slo=SLO_)
    assert host.ttft_s[0] - free.ttft_s[0] == pytest.approx(0.003, rel=1e-6)
    assert host.tpot_s[0] == pytest.approx(free.tpot_s[0], rel=1e-9)
    two = _trace([(0.0, 512, 2), (0.0001, 512, 2)])  # the second arrives while the first prefills
    free2 = _sim(placement, chunk_tokens=512, prefill_token_budget=512, colocated_token_budget=512).run(two, slo=SLO_)
    host2 = _sim(placement, chunk_tokens=512, prefill_token_budget=512, colocated_token_budget=512,
                 prefill_host_s=0.003).run(two, slo=SLO_)
    assert host2.ttft_s[1] - free2.ttft_s[1] == pytest.approx(0.006, rel=1e-3)
    with pytest.raises(ValueError, match="prefill_host_s"):
        SimConfig(prefill_host_s=-0.001)


def test_dispatch_spreads_over_instances():
    trace = generate_trace(num_requests=400, rate=30.0, lengths=FixedLengths(prompt_len=600, output_len=20), seed=0)
    one = _sim(_disagg()).run(trace, slo=SLO(ttft_s=0.3, tpot_s=0.1))
    four = _sim(_disagg(n=4, m=2)).run(trace, slo=SLO(ttft_s=0.3, tpot_s=0.1))
    assert four.attainment > 0.95 > one.attainment


def test_colocated_prefill_stalls_decodes():
    trace = _trace([(0.0, 100, 50), (0.3, 1800, 2)])
    colo = _sim(Placement.colocated(tp=1)).run(trace, slo=SLO_)
    alone = _sim(Placement.colocated(tp=1)).run(trace.head(1), slo=SLO_)
    stall = COEFFS.prefill_ms(1800, 1800**2) * 1e-3
    assert colo.tpot_s[0] * 49 - alone.tpot_s[0] * 49 == pytest.approx(stall, rel=0.05)
    dis = _sim(_disagg()).run(trace, slo=SLO_)
    assert dis.tpot_s[0] == pytest.approx(alone.tpot_s[0], rel=0.01)  # no stall, one shared step


def test_chunked_prefill_bounds_the_stall():
    trace = _trace([(0.0, 100, 50), (0.3, 1800, 2)])
    colo = _sim(Placement.colocated(tp=1)).run(trace, slo=SLO_)
    chunked = _sim(Placement.colocated(tp=1, mode="chunked"), chunk_tokens=256).run(trace, slo=SLO_)
    assert chunked.tpot_s[0] < colo.tpot_s[0]
    assert chunked.ttft_s[1] > colo.ttft_s[1]
    single = _sim(Placement.colocated(tp=1, mode="chunked"), chunk_tokens=4096).run(trace.head(1), slo=SLO_)
    assert single.ttft_s[0] == pytest.approx(COEFFS.prefill_ms(100, 100**2) * 1e-3)


def test_no_per_token_events(monkeypatch):
    from dsjax.planner import events

    counts = []
    real_run = events.EventLoop.run

    def counting_run(self):
        real_run(self)
        counts.append(self.num_events)

    monkeypatch.setattr(events.EventLoop, "run", counting_run)
    trace = generate_trace(num_requests=500, rate=5.0, lengths=FixedLengths(prompt_len=300, output_len=200), seed=0)
    _sim(_disagg()).run(trace, slo=SLO_)
    assert counts[0] < 10 * len(trace) < int(trace.output_len.sum())


def test_simulator_validates_configs():
    with pytest.raises(ValueError, match="does not divide num_heads"):
        _sim(_disagg(tp=3))
    with pytest.raises(ValueError, match="does not fit"):
        _sim(_disagg(), memory=MemoryModel(model=MODEL, table={"facebook/opt-13b": {}}))
    with pytest.raises(ValueError, match="phase='prefill' needs a disaggregated"):
        _sim(Placement.colocated(tp=1)).run(_trace([(0.0, 1, 1)]), slo=SLO_, phase="prefill")
    with pytest.raises(ValueError, match="prefill_token_budget=0"):
        SimConfig(prefill_token_budget=0)


def test_colocated_prefill_batches_take_at_most_prefill_max_batch_size_prompts():
    """As the engine's pick_prefill_batch (max_prefill_seqs): 5 prompts at once; the first runs
    alone (it arrives to an idle instance), the other 4 in batches of 2 (without the cap: one)."""
    trace = _trace([(0.0, 10, 3)] * 5)
    res = _sim(Placement.colocated(tp=1), prefill_max_batch_size=2, colocated_token_budget=4096).run(trace, slo=SLO_)
    assert len(set(np.round(res.ttft_s, 9))) == 3
    assert len(set(np.round(_sim(Placement.colocated(tp=1)).run(trace, slo=SLO_).ttft_s, 9))) == 2


def test_router_prefill_cap_holds_requests_in_the_router():
    """prefill_max_inflight (the router's cap on Prefill calls an instance holds): past it requests
    wait in the router for a freed slot, first come first served, instead of joining a queue."""
    trace = _trace([(0.0, 100, 1), (0.001, 100, 1), (0.002, 100, 1)])
    p1 = COEFFS.prefill_ms(100, 100**2) * 1e-3
    free = _sim(_disagg(), prefill_token_budget=1024).run(trace, slo=SLO_)
    capped = _sim(_disagg(), prefill_token_budget=1024, prefill_max_inflight=1).run(trace, slo=SLO_)
    # no cap: the two later prompts queue on the instance and run as one batch after the first
    p2 = COEFFS.prefill_ms(200, 2 * 100**2) * 1e-3
    assert free.ttft_s[2] + 0.002 == pytest.approx(p1 + p2)
    # capped at one call: each reaches the instance only when the one before it returned
    assert capped.ttft_s[2] + 0.002 == pytest.approx(3 * p1)
    assert capped.ttft_s[1] + 0.001 == pytest.approx(2 * p1)
    # a cap the load never reaches changes nothing
    busy = generate_trace(num_requests=300, rate=20.0, lengths=FixedLengths(prompt_len=300, output_len=8), seed=1)
    placement = _disagg(n=2, m=2)
    a = _sim(placement).run(busy, slo=SLO_)
    b = _sim(placement, prefill_max_inflight=10_000).run(busy, slo=SLO_)
    np.testing.assert_array_equal(a.ttft_s, b.ttft_s)
    with pytest.raises(ValueError, match="prefill_max_inflight"):
        SimConfig(prefill_max_inflight=0)
