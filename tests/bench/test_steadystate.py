import pytest

from dsjax.bench.steadystate import describe, probe_rates, steady_run_length, steady_summary


def test_steady_run_length_is_twelve_lifetimes_at_the_slo_pace():
    # OPT-66B ShareGPT: mean output ~325 tokens at 0.15 s a token -> 585 s, the first third settling
    assert steady_run_length(325.0, 0.15) == (195.0, 585.0)
    assert steady_run_length(10.0, 0.1) == (20.0, 60.0)  # never shorter than 60 s
    with pytest.raises(ValueError, match="tpot_slo_s"):
        steady_run_length(100.0, 0.0)


def test_probe_rates_bracket_the_short_run_goodput():
    rates = probe_rates(20.0)
    assert rates[0] == 10.0 and rates[-1] == pytest.approx(20.0 * 2 ** 0.5, rel=0.01)
    assert 20.0 in rates and list(rates) == sorted(set(rates))
    with pytest.raises(ValueError, match="start"):
        probe_rates(0.0)


def test_steady_summary_ratios_per_device():
    s = steady_summary({"disaggregated": 16.0, "colocated": 18.0, "vllm": 11.0},
                       {"disaggregated": 28, "colocated": 32, "vllm": 32}, {"vllm": True}, settle_s=195.0, run_s=585.0)
    assert s["systems"]["disaggregated"]["per_device_goodput"] == pytest.approx(16 / 28)
    assert s["disaggregated_over_colocated_ratio"] == pytest.approx((16 / 28) / (18 / 32))
    assert s["disaggregated_over_vllm_ratio"] == pytest.approx((16 / 28) / (11 / 32))
    assert "disaggregated_over_chunked_ratio" not in s
    assert s["systems"]["vllm"]["saturated"] and not s["systems"]["colocated"]["saturated"]
    line = describe(s)
    assert "585-s runs" in line and "vllm 1.66x" in line and "saturated" in line
    # no disaggregated system: no ratios
    assert not [k for k in steady_summary({"colocated": 1.0}, {"colocated": 2}, {}, settle_s=1, run_s=3) if k.endswith("_ratio")]
