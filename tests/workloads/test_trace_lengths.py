import json

import numpy as np
import pytest

from dsjax.workloads.trace_gen import (
    SHAREGPT_LIKE,
    FixedLengths,
    LognormalLengths,
    PairLengths,
    Trace,
    UniformLengths,
    gamma_arrivals,
    generate_trace,
    length_sampler_from_spec,
    read_trace,
    resample,
    rescale_rate,
    write_trace,
)


def test_jsonl_round_trip(tmp_path):
    trace = generate_trace(num_requests=50, rate=3.0, lengths=SHAREGPT_LIKE, seed=1)
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"arrival_s", "prompt_len", "output_len"}
    back = read_trace(path)
    np.testing.assert_allclose(back.arrival_s, trace.arrival_s, atol=1e-6)
    np.testing.assert_array_equal(back.prompt_len, trace.prompt_len)
    np.testing.assert_array_equal(back.output_len, trace.output_len)


def test_read_trace_names_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 3, "output_len": 2}\n{"arrival_s": 1, "prompt_len": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_trace(path)


def test_generators_are_seeded_and_sorted():
    a = generate_trace(num_requests=200, rate=2.0, lengths=SHAREGPT_LIKE, seed=7)
    b = generate_trace(num_requests=200, rate=2.0, lengths=SHAREGPT_LIKE, seed=7)
    c = generate_trace(num_requests=200, rate=2.0, lengths=SHAREGPT_LIKE, seed=8)
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.prompt_len, b.prompt_len)
    assert not np.array_equal(a.prompt_len, c.prompt_len)
    assert np.all(np.diff(a.arrival_s) >= 0)


def test_poisson_rate_and_gamma_burstiness():
    rng = np.random.default_rng(0)
    gaps = np.diff(gamma_arrivals(rng, 20000, rate=4.0, cv=3.0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
    t = generate_trace(num_requests=20000, rate=4.0, lengths=FixedLengths(prompt_len=8, output_len=2), seed=0)
    assert t.mean_rate == pytest.approx(4.0, rel=0.03)


def test_rescale_rate_is_exact_and_keeps_shape():
    t = generate_trace(num_requests=100, rate=1.0, lengths=FixedLengths(prompt_len=8, output_len=2), arrival="gamma", cv=2.0)
    r = rescale_rate(t, 5.0)
    assert r.mean_rate == pytest.approx(5.0)
    assert r.arrival_s[0] == 0.0
    rel = t.arrival_s - t.arrival_s[0]
    np.testing.assert_allclose(r.arrival_s / r.arrival_s[-1], rel / rel[-1])
    with pytest.raises(ValueError, match="rate=0"):
        rescale_rate(t, 0)


def test_lognormal_respects_cap_and_sharegpt_like_stats():
    t = generate_trace(num_requests=20000, rate=1.0, lengths=SHAREGPT_LIKE, seed=0)
    assert int((t.prompt_len + t.output_len).max()) < 2048
    s = t.stats()
    assert 600 <= s["prompt_mean"] <= 760 and 500 <= s["prompt_median"] <= 650
    assert 160 <= s["output_mean"] <= 220 and 90 <= s["output_median"] <= 140
    small = LognormalLengths(prompt_median=100, prompt_sigma=0.5, output_median=10, output_sigma=0.5, max_total=200)
    p, o = small.sample(np.random.default_rng(0), 1000)
    assert (p + o).max() < 200 and p.min() >= 1 and o.min() >= 1


def test_pair_and_uniform_samplers():
    pairs = [(10, 1), (20, 2), (30, 3)]
    p, o = PairLengths(pairs=pairs, shuffle=False).sample(np.random.default_rng(0), 5)
    assert p.tolist() == [10, 20, 30, 10, 20] and o.tolist() == [1, 2, 3, 1, 2]
    p, o = UniformLengths(prompt_min=5, prompt_max=6, output_min=1, output_max=1).sample(np.random.default_rng(0), 100)
    assert set(p.tolist()) == {5, 6} and set(o.tolist()) == {1}
    with pytest.raises(ValueError, match=r"\(0, 4\)"):
        PairLengths(pairs=[(0, 4)])


def test_length_specs():
    assert length_sampler_from_spec("sharegpt-like") is SHAREGPT_LIKE
    assert length_sampler_from_spec("fixed:512:64") == FixedLengths(prompt_len=512, output_len=64)
    assert isinstance(length_sampler_from_spec("uniform:1:10:1:5"), UniformLengths)
    assert isinstance(length_sampler_from_spec("lognormal:500:1:100:1:4096"), LognormalLengths)
    with pytest.raises(ValueError, match="unknown length spec"):
        length_sampler_from_spec("zipf:1")


def test_trace_validation():
    with pytest.raises(ValueError, match="prompt_len must be >= 1"):
        Trace(arrival_s=np.zeros(2), prompt_len=np.array([3, 0]), output_len=np.array([1, 1]))
    with pytest.raises(ValueError, match="one length"):
        Trace(arrival_s=np.zeros(2), prompt_len=np.array([3]), output_len=np.array([1, 1]))


def test_resample_short_trace_draws_pairs():
    short = generate_trace(num_requests=20, rate=1.0, lengths=SHAREGPT_LIKE, seed=0)
    big = resample(short, num_requests=500, seed=1)
    assert len(big) == 500 and big.mean_rate == pytest.approx(1.0)
    assert set(big.pairs()) <= set(short.pairs())
    long = generate_trace(num_requests=600, rate=3.0, lengths=SHAREGPT_LIKE, seed=0)
    head = resample(long, num_requests=500)
    assert head.pairs() == long.pairs()[:500] and head.mean_rate == pytest.approx(1.0)
