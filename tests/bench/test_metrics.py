"""Benchmark metrics on scripted token timings whose answers are worked out by hand."""

import csv
import json
import math

import pytest

from dsjax.bench import metrics as bm

TTFT_SLO, TPOT_SLO = 1.0, 0.5


def rec(send, times, *, error=None, prompt_len=10):
    return bm.RequestRecord(
        send_s=send, token_times_s=tuple(times), prompt_len=prompt_len, output_len=len(times) or 3, error=error
    )


@pytest.fixture
def mixed():
    return [
        rec(0.0, [0.5, 1.0, 1.5]),  # A: TTFT 0.5, TPOT 0.5 -> meets both (SLOs are inclusive)
        rec(0.0, [2.0]),  # B: one token, TTFT 2.0 misses; TPOT trivially met
        rec(1.0, [1.25, 2.25, 3.25]),  # C: TTFT 0.25 meets, TPOT 1.0 misses
        rec(0.0, [], error="connection reset"),  # D: failed -> misses everything
        rec(0.0, [0.75]),  # E: one token, TTFT 0.75 -> meets both
    ]


def test_per_request_metrics_from_messages():
    r = bm.RequestRecord.from_messages(send_s=0.0, messages=[(0.5, 1), (0.7, 2), (1.1, 1)], prompt_len=4, output_len=4)
    assert r.token_times_s == (0.5, 0.7, 0.7, 1.1)
    assert bm.ttft_s(r) == 0.5
    assert bm.tpot_s(r) == pytest.approx(0.2)
    assert bm.inter_token_latencies_s(r) == pytest.approx([0.2, 0.0, 0.4])
    assert bm.e2e_latency_s(r) == 1.1


def test_single_token_has_no_tpot_and_meets_it():
    r = rec(1.0, [3.0])
    assert bm.ttft_s(r) == 2.0
    assert bm.tpot_s(r) is None
    assert bm.inter_token_latencies_s(r) == []
    assert bm.meets_tpot(r, 1e-9)
    assert not bm.meets_ttft(r, 1.0)


def test_failed_requests_have_no_latencies():
    for r in (rec(0.0, [], error="boom"), rec(0.0, [1.0, 2.0], error="aborted"), rec(0.0, [])):
        assert not r.ok
        assert bm.ttft_s(r) is None and bm.tpot_s(r) is None and bm.e2e_latency_s(r) is None
        assert not bm.meets_ttft(r, 100.0) and not bm.meets_tpot(r, 100.0)


def test_attainment_mixed(mixed):
    a = bm.attainment(mixed, TTFT_SLO, TPOT_SLO)
    assert (a.num_requests, a.ttft, a.tpot, a.joint) == (5, 0.6, 0.6, 0.4)


def test_attainment_all_and_none_meeting():
    good = [rec(0.0, [0.5, 0.75, 1.0]), rec(2.0, [2.25])]
    assert bm.attainment(good, TTFT_SLO, TPOT_SLO) == bm.Attainment(num_requests=2, ttft=1.0, tpot=1.0, joint=1.0)
    bad = [rec(0.0, [5.0, 6.0]), rec(0.0, [], error="timeout")]
    assert bm.attainment(bad, TTFT_SLO, TPOT_SLO) == bm.Attainment(num_requests=2, ttft=0.0, tpot=0.0, joint=0.0)


def test_percentiles_over_served_requests(mixed):
    lat = bm.latency_percentiles(mixed)
    # TTFTs of A, B, C, E sorted: 0.25 0.5 0.75 2.0 (linear interpolation between order statistics)
    assert lat["ttft"] == pytest.approx({"p50": 0.625, "p90": 1.625, "p99": 1.9625})
    assert lat["tpot"] == pytest.approx({"p50": 0.75, "p90": 0.95, "p99": 0.995})  # A 0.5, C 1.0
    assert lat["e2e"]["p50"] == pytest.approx(1.75)  # 0.75 1.5 2.0 2.25
    assert lat["itl"]["p50"] == pytest.approx(0.75)  # 0.5 0.5 1.0 1.0
    empty = bm.latency_percentiles([rec(0.0, [], error="x")])
    assert all(math.isnan(v) for points in empty.values() for v in points.values())


def test_throughput(mixed):
    t = bm.throughput(mixed)
    # first send 0.0, last token 3.25; 4 served requests, 8 output tokens, 4 x 10 prompt tokens
    assert t.duration_s == 3.25
    assert t.request_rate == pytest.approx(4 / 3.25)
    assert t.output_token_rate == pytest.approx(8 / 3.25)
    assert t.total_token_rate == pytest.approx(48 / 3.25)
    none = bm.throughput([rec(0.0, [], error="x")])
    assert none.request_rate == 0.0 and math.isnan(none.duration_s)


def test_tightest_slo_scale(mixed):
    # scores max(TTFT/1, TPOT/0.5): A 1.0, B 2.0, C 2.0, D inf, E 0.75 -> sorted 0.75 1 2 2 inf
    assert bm.slo_scores(mixed, TTFT_SLO, TPOT_SLO) == [1.0, 2.0, 2.0, math.inf, 0.75]
    assert bm.tightest_slo_scale(mixed, TTFT_SLO, TPOT_SLO, target=0.2) == 0.75
    assert bm.tightest_slo_scale(mixed, TTFT_SLO, TPOT_SLO, target=0.4) == 1.0
    assert bm.tightest_slo_scale(mixed, TTFT_SLO, TPOT_SLO, target=0.8) == 2.0
    assert bm.tightest_slo_scale(mixed, TTFT_SLO, TPOT_SLO) == math.inf  # 90% needs the failed one
    # consistency with attainment at the returned scale, and just below it
    assert bm.attainment(mixed, 2.0 * TTFT_SLO, 2.0 * TPOT_SLO).joint == 0.8
    assert bm.attainment(mixed, 1.99 * TTFT_SLO, 1.99 * TPOT_SLO).joint == 0.4


def test_tightest_slo_scale_target_rounding():
    # 10 requests with scores 0.1 .. 1.0: 90% needs 9 of them (0.9 * 10 must not round up to 10)
    records = [rec(0.0, [k / 10]) for k in range(1, 11)]
    assert bm.tightest_slo_scale(records, 1.0, 1.0, target=0.9) == pytest.approx(0.9)
    assert bm.tightest_slo_scale(records, 1.0, 1.0, target=1.0) == pytest.approx(1.0)


def step_measure(threshold):
    calls = []

    def measure(rate):
        calls.append(rate)
        return 1.0 if rate <= threshold else 0.5

    return measure, calls


def test_goodput_scan_then_bisect():
    measure, calls = step_measure(3.3)
    result = bm.goodput(measure, [1, 2, 3, 4, 5])
    # scan stops at the first failure (4); bisection 3.5 f, 3.25 p, 3.375 f, 3.3125 f, 3.28125 p,
    # then the bracket (3.28125, 3.3125] is within 1% of 3.3125.
    assert calls == [1, 2, 3, 4, 3.5, 3.25, 3.375, 3.3125, 3.28125]
    assert result.rate == 3.28125 and not result.saturated
    assert result.probes[3] == (4, 0.5)


def test_goodput_saturated_and_first_rate_failing():
    measure, _ = step_measure(100.0)
    assert bm.goodput(measure, [1.0, 2.0]) == bm.GoodputResult(
        rate=2.0, probes=((1.0, 1.0), (2.0, 1.0)), saturated=True
    )
    measure, _ = step_measure(0.3)
    low = bm.goodput(measure, [1.0, 2.0], max_bisections=20)
    assert 0.29 < low.rate <= 0.3
    never = bm.goodput(lambda rate: 0.0, [1.0], max_bisections=5)
    assert never.rate == 0.0 and len(never.probes) == 6


def test_goodput_target_is_inclusive():
    assert bm.goodput(lambda rate: 0.9, [1.0, 2.0]).saturated


def test_writers_roundtrip(tmp_path, mixed):
    summary = bm.summarize_run(mixed, TTFT_SLO, TPOT_SLO)
    assert summary.num_failed == 1
    rows = [summary.to_row(system="dsjax", rate=1.5), {"system": "vllm", "extra": None}]
    bm.write_results_json(tmp_path / "r.json", rows)
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded[0]["attainment_joint"] == 0.4 and loaded[0]["system"] == "dsjax"
    assert loaded[0]["ttft_p50_s"] == pytest.approx(0.625)
    bm.write_results_csv(tmp_path / "r.csv", rows)
    with open(tmp_path / "r.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:3] == ["system", "rate", "num_requests"] and list(table[0])[-1] == "extra"
    assert table[0]["attainment_joint"] == "0.4" and table[1]["system"] == "vllm" and table[1]["rate"] == ""


def test_nan_becomes_null_in_json(tmp_path):
    bm.write_results_json(tmp_path / "n.json", [{"x": math.nan, "y": math.inf, "z": 1.0}])
    assert json.loads((tmp_path / "n.json").read_text()) == [{"x": None, "y": None, "z": 1.0}]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(send_s=1.0, token_times_s=(0.5,)),
        dict(send_s=0.0, token_times_s=(1.0, 0.5)),
        dict(send_s=math.nan, token_times_s=()),
        dict(send_s=0.0, token_times_s=(math.inf,)),
    ],
)
def test_record_validation(kwargs):
    with pytest.raises(ValueError):
        bm.RequestRecord(prompt_len=1, output_len=1, **kwargs)


def test_public_boundaries_validate(mixed):
    with pytest.raises(ValueError, match="ttft_slo_s"):
        bm.attainment(mixed, 0.0, 1.0)
    with pytest.raises(ValueError):
        bm.attainment([], 1.0, 1.0)
    with pytest.raises(ValueError, match="rates"):
        bm.goodput(lambda r: 1.0, [2.0, 1.0])
    with pytest.raises(ValueError, match="target"):
        bm.tightest_slo_scale(mixed, 1.0, 1.0, target=0.0)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.RequestRecord.from_messages(send_s=0.0, messages=[(1.0, -1)], prompt_len=1, output_len=1)
