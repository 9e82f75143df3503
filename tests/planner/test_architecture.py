"""The planner picks the architecture (dsjax/planner/architecture.py): disaggregated, colocated,
chunked or a mix, by the cluster's goodput, or by the fewest devices for a target rate."""

import math

import pytest

from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.planner.algorithms import Plan
from dsjax.planner.architecture import choose_architecture


def _disagg(unit_goodput: float, copies: int, *, tp_p=2, tp_d=1) -> Plan:
    unit = Placement(mode="disaggregated", prefill=PhaseParallel(tp=tp_p, pp=1, replicas=1),
                     decode=PhaseParallel(tp=tp_d, pp=1, replicas=1))
    whole = Placement(mode="disaggregated", prefill=PhaseParallel(tp=tp_p, pp=1, replicas=copies),
                      decode=PhaseParallel(tp=tp_d, pp=1, replicas=copies))
    return Plan(placement=whole, goodput=unit_goodput * copies, per_device_goodput=unit_goodput / (tp_p + tp_d),
                algorithm="low", details={"unit": unit.to_dict(), "unit_goodput": unit_goodput, "copies": copies})


def _instance(goodput: float, tp: int, mode: str = "colocated") -> Plan:
    return Plan(placement=Placement.colocated(tp=tp, pp=1, mode=mode), goodput=goodput, per_device_goodput=goodput / tp,
                algorithm=mode)


def test_colocated_wins_when_disaggregation_serves_less():
    """OPT-13B ShareGPT on 8 GPUs: the disaggregated plan is 0.85x colocated per device, so the
    planner must not hand it out."""
    choice = choose_architecture(_disagg(3.0, 2), {"colocated": _instance(2.35, 2), "chunked": _instance(2.0, 2, "chunked")},
                                 num_devices=8)
    assert choice.chosen.architecture == "colocated"
    assert choice.chosen.goodput == pytest.approx(4 * 2.35) and choice.chosen.num_devices == 8
    assert choice.gain_over("disaggregated") == pytest.approx(9.4 / 6.0)
    assert "chose colocated" in choice.describe()


def test_disaggregated_wins_and_leftover_devices_make_a_mixed_fleet():
    # a 3-device unit (TP2 prefill + TP1 decode) fits twice in 8 devices, leaving 2 for a colocated TP2
    choice = choose_architecture(_disagg(9.0, 2), {"colocated": _instance(2.0, 2)}, num_devices=8)
    mixed = choice.fleet("mixed")
    assert mixed.goodput == pytest.approx(2 * 9.0 + 2.0) and mixed.num_devices == 8
    assert choice.chosen is mixed
    assert choice.gain_over("disaggregated") == pytest.approx(20.0 / 18.0)
    assert choice.gain_over("colocated") == pytest.approx(20.0 / 8.0)
    # with nothing left over there is no mixed fleet
    exact = choose_architecture(_disagg(9.0, 2), {"colocated": _instance(2.0, 2)}, num_devices=6)
    assert exact.chosen.architecture == "disaggregated" and exact.fleet("mixed") is None


def test_target_rate_picks_the_fewest_devices():
    plans = (_disagg(9.0, 4), {"colocated": _instance(4.0, 2), "chunked": _instance(3.0, 2, "chunked")})
    choice = choose_architecture(*plans, num_devices=16, rate=20.0)
    # disaggregated: 3 units = 9 devices; colocated: 5 instances = 10; mixed: 2 units + 1 TP2 (20 - 18 = 2) = 8
    assert {f.architecture: f.num_devices for f in choice.fleets} == {"disaggregated": 9, "colocated": 10, "chunked": 14,
                                                                      "mixed": 8}
    assert choice.chosen.architecture == "mixed" and choice.chosen.goodput >= 20.0
    assert choice.gain_over("colocated") == pytest.approx(10 / 8)
    # a rate the cluster cannot serve with some architecture leaves that one out
    big = choose_architecture(*plans, num_devices=16, rate=34.0)  # colocated would need 9 TP2 instances
    assert big.fleet("chunked") is None and big.fleet("colocated") is None and big.chosen.goodput >= 34.0
    with pytest.raises(ValueError, match="no architecture serves"):
        choose_architecture(*plans, num_devices=16, rate=100.0)


def test_ties_prefer_fewer_devices_then_the_simpler_architecture():
    choice = choose_architecture(_disagg(6.0, 2), {"colocated": _instance(2.0, 1)}, num_devices=6)
    assert choice.fleet("disaggregated").goodput == pytest.approx(choice.fleet("colocated").goodput)
    assert choice.chosen.architecture == "disaggregated"
    zero = choose_architecture(_disagg(0.0, 1), {"colocated": _instance(1.0, 1)}, num_devices=3)
    assert zero.chosen.architecture == "colocated" and math.isinf(zero.gain_over("disaggregated"))
    assert zero.to_dict()["criterion"] == "highest goodput on the cluster"
