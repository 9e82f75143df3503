from planner_reference import distserve_profile, max_num_tokens_csv

from dsjax.placement import Placement, PhaseParallel
from dsjax.planner.algorithms import ClusterSpec
from dsjax.planner.latency import load_profile
from dsjax.planner.metrics import SLO
from dsjax.planner.models import MemoryModel, get_model, read_max_num_tokens
from dsjax.planner.replan import check_and_replan
from dsjax.planner.search import GoodputConfig
from dsjax.planner.trace import SHAREGPT_LIKE, generate_trace


def _check(rate, window):
    m = get_model("opt-13b")
    return check_and_replan(
        placement=Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel(tp=1)),
        window=window, rate=rate, profile=load_profile(distserve_profile()), model=m,
        memory=MemoryModel(model=m, table=read_max_num_tokens(max_num_tokens_csv())),
        slo=SLO(ttft_s=0.25, tpot_s=0.1), cluster=ClusterSpec(num_nodes=2, gpus_per_node=8),
        goodput_config=GoodputConfig(min_requests=300, max_requests=1500, rel_tol=0.05),
    )


def test_no_replan_when_the_plan_holds():
    window = generate_trace(num_requests=200, rate=1.0, lengths=SHAREGPT_LIKE, seed=0).pairs()
    r = _check(1.0, window)
    assert not r.needs_replan and r.proposed is None and r.attainment >= 0.9


def test_replan_proposes_a_bigger_plan_under_load():
    window = generate_trace(num_requests=200, rate=1.0, lengths=SHAREGPT_LIKE, seed=0).pairs()
    r = _check(15.0, window)
    assert r.needs_replan and r.proposed is not None
    assert r.proposed.num_devices > r.current.num_devices
    assert r.proposed_attainment >= 0.85
    assert "proposing" in r.reason


def test_replan_reports_when_nothing_fits():
    long_window = [(1800, 200)] * 50
    r = _check(200.0, long_window)
    assert r.needs_replan and r.proposed is None and "no placement found" in r.reason
