"""`python -m dsjax.bench compare --emulate` (dsjax/bench/emucompare.py, emulated_setup.py): the
planner's placements for N emulated devices, and a small end-to-end run through real servers."""

import json

import pytest

from dsjax.bench.analysis import SLOs
from dsjax.bench.cli import main
from dsjax.bench.emucompare import emulated_compare, resolve_slos, scan_rates
from dsjax.bench.emulated_setup import EmulatedCluster, plan_systems, server_argv
from dsjax.engine.placement import Placement
from dsjax.planner.latency import load_profile
from dsjax.serve import parse_args, placement_from_args

# OPT-13B shaped like DistServe's A100 fit, 10x faster: a test run's requests take milliseconds.
FAST = {"prefill": [1.8, 0.0102, 7.1e-7], "decoding_smallbs": [2.0, 6.3e-5, 0.0039],
        "decoding_largebs": [0.72, 5.8e-5, 0.0158], "decoding_large_small_bs_threshold": 95}
HUMANEVAL_LENGTHS = [(150, 80), (120, 60), (300, 150), (90, 40)] * 50


def write_profile(path, tps=(1, 2), slower=1.0):
    coeffs = {k: [slower * c for c in v] if isinstance(v, list) else v for k, v in FAST.items()}
    path.write_text(json.dumps({"facebook/opt-13b": {str(tp): coeffs for tp in tps}}))
    return path


def test_placements_fill_the_cluster_from_the_planner(tmp_path):
    cluster = EmulatedCluster(profile_path=write_profile(tmp_path / "p.json"), model="opt-13b", devices=4)
    assert (cluster.cluster.num_nodes, cluster.cluster.gpus_per_node) == (1, 4)
    plans = plan_systems(cluster, HUMANEVAL_LENGTHS, SLOs(ttft_s=0.05, tpot_s=0.02), ("disaggregated", "colocated", "chunked"))
    d = plans["disaggregated"].placement
    assert d.mode == "disaggregated" and 2 <= d.num_devices <= 4 and plans["disaggregated"].planner_goodput > 0
    for mode in ("colocated", "chunked"):
        p = plans[mode].placement
        assert p.mode == mode and p.prefill.replicas * p.prefill.tp * p.prefill.pp == 4
        assert plans[mode].details["table"]  # every (tp, pp) the planner tried
    # the server is handed exactly that placement (its --plan file), on the whole emulated cluster
    plan_path = tmp_path / "plan.json"
    from dsjax.engine.placement import save_plan

    save_plan(plan_path, d)
    args = parse_args(server_argv("disaggregated", d, cluster, plan_path, port=1234))
    got = placement_from_args(args)
    assert (got.prefill.tp, got.prefill.pp, got.prefill.replicas, got.decode.tp, got.decode.replicas) == \
        (d.prefill.tp, d.prefill.pp, d.prefill.replicas, d.decode.tp, d.decode.replicas)
    assert args.emulate_devices == 4 and args.workers == "inprocess" and args.max_num_seqs == 256


def test_cluster_and_slo_validation(tmp_path):
    with pytest.raises(ValueError, match="multiple of gpus_per_node"):
        EmulatedCluster(profile_path=tmp_path / "p.json", model="opt-13b", devices=12)
    assert EmulatedCluster(profile_path=tmp_path / "p.json", model="opt-66b", devices=32).cluster.num_nodes == 4
    cluster = EmulatedCluster(profile_path=tmp_path / "p.json", model="opt-66b", devices=8)
    slos, how = resolve_slos(emulated_compare(quick=True, cluster=cluster, out=tmp_path, workload="humaneval").compare)
    assert (slos.ttft_s, slos.tpot_s, how["rule"]) == (0.125, 0.2, "DistServe OSDI Table 1")
    with pytest.raises(ValueError, match="pass --ttft and --tpot"):
        resolve_slos(emulated_compare(quick=True, cluster=cluster, out=tmp_path, workload="longbench", model="opt-13b").compare)
    sim = cluster.sim_config()
    assert (sim.prefill_max_batch_size, sim.decode_max_batch_size, sim.chunked_fused_steps) == (16, 256, True)


def test_two_device_emulated_compare_end_to_end(tmp_path, capsys):
    """Two real emulated servers (python -m dsjax.serve --emulate), five rates each, the
    simulator beside every run, the summary's keys and the plots."""
    import gc

    out = tmp_path / "cmp"
    thresholds = gc.get_threshold()
    rc = main(["compare", "--emulate", str(write_profile(tmp_path / "p.json")), "--model", "opt-13b",
               "--workload", "humaneval", "--devices", "2", "--num-requests", "6", "--source-limit", "20",
               "--baseline-profile", str(write_profile(tmp_path / "vllm.json", slower=1.5)),
               "--systems", "disaggregated,vllm",
               "--rates", "20,40,60,80,100", "--max-bisections", "0", "--settle-seconds", "0", "--ttft", "0.1", "--tpot", "0.02",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    # the client quieted its collector for the sweeps and gave it back as it was
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_device_goodput"]) == {"disaggregated", "vllm"}
    for system in ("disaggregated", "vllm"):  # and counted its own pauses while they ran
        assert set(summary["systems"][system]["client_gc"]) == {"gen0", "gen1", "gen2"}
    assert summary["devices"] == 2 and summary["emulation"]["enough_fidelity_rates"]
    assert summary["emulation"]["fidelity_rates_per_system"] == {"disaggregated": 5, "vllm": 5}
    assert 0 <= summary["max_attainment_gap_points"] <= 100
    assert "disaggregated_over_vllm_ratio" in summary and "disaggregated_over_vllm" in summary["ratios"]
    # the baseline is colocated replicas priced by the other profile
    vllm = summary["emulation"]["systems"]["vllm"]
    assert vllm["planner"]["profile"].endswith("vllm.json") and Placement.from_dict(vllm["placement"]).mode == "colocated"
    for system, d in summary["systems"].items():
        assert Placement.from_dict(d["placement"]).num_devices == d["num_devices"] <= 2
        assert d["max_attainment_gap_points"] is not None
    assert all("simulated" in f and "real" in f for f in summary["fidelity"])
    for f in summary["fidelity"]:  # every run decoded: the emulated devices counted their host time
        assert f["continued_steps"] > 0 and f["decode_host_ms"] >= 0 and 0 <= f["simulated_with_host"] <= 1
        assert f["prefill_launches"] > 0 and f["prefill_host_ms"] >= 0
        lo, hi = f["sim_jitter_band"]
        assert lo <= f["simulated"] <= hi and f["gap_beyond_jitter_points"] <= abs(f["diff_points"]) + 1e-9
    assert summary["max_gap_with_host_points"] is not None and summary["max_gap_beyond_jitter_points"] is not None
    for f in summary["fidelity"]:  # the gap read as a rate: 0 where the simulator agrees, else its sign
        g = f["rate_equivalent_gap_pct"]
        assert abs(g) <= 25 and (g == 0) == (f["real"] == f["simulated"]) and (g > 0) == (f["real"] < f["simulated"])
    assert summary["max_rate_equivalent_gap_pct"] == max(abs(f["rate_equivalent_gap_pct"]) for f in summary["fidelity"])
    for f in summary["fidelity"]:  # the router's own arrival times replayed: after the schedule, by little
        assert 0 <= f["router_side_attainment"] <= 1 and 0 <= f["simulated_at_arrivals"] <= 1
        p50, p90, worst = f["arrival_lag_ms"]
        assert 0 < p50 <= p90 <= worst < 5000
    assert summary["max_arrival_replay_gap_points"] == max(abs(f["arrival_replay_gap_points"]) for f in summary["fidelity"])
    sent = [json.loads(line) for line in next(out.glob("requests-vllm-*.jsonl")).read_text().splitlines()]
    assert all(r["server_arrival_s"] >= r["send_s"] for r in sent)
    # the run's simulators rebuilt from summary.json replay every rate exactly as the run did
    from dsjax.bench.resimulate import resimulate

    again = resimulate(out, around=(1.1,))
    assert [(r["system"], r["rate"], r["simulated_now"]) for r in again] == \
        [(f["system"], f["rate"], f["simulated"]) for f in summary["fidelity"]]
    capped = resimulate(out, prefill_cap=1, systems=("disaggregated",))
    assert {r["system"] for r in capped} == {"disaggregated"} and all(0 <= r["simulated_now"] <= 1 for r in capped)
    for png in ("attainment_vs_rate.png", "attainment_vs_slo_scale.png", "fidelity.png"):
        assert (out / png).stat().st_size > 1000
    assert "largest |measured - simulated|" in (out / "summary.md").read_text()
    # the simulator's steady-state goodput of both placements, on 60-s runs (12 lifetimes is less)
    steady = summary["steady_state"]
    assert steady["run_seconds"] == 60.0 and steady["settle_s"] == 20.0 and set(steady["systems"]) == {"disaggregated", "vllm"}
    for system, d in steady["systems"].items():
        assert d["goodput"] > 0 and d["per_device_goodput"] == pytest.approx(d["goodput"] / summary["systems"][system]["num_devices"])
    assert summary["steady_state_disaggregated_over_vllm_ratio"] == pytest.approx(
        steady["systems"]["disaggregated"]["per_device_goodput"] / steady["systems"]["vllm"]["per_device_goodput"])
    printed = capsys.readouterr().out
    assert '"max_attainment_gap_points"' in printed and '"steady_state_disaggregated_over_vllm_ratio"' in printed


def test_plan_only_starts_no_server(tmp_path, capsys, monkeypatch):
    """--plan-only: the placements, the simulated goodputs and the steady-state ratios, and no
    run (a sweep would raise)."""
    import dsjax.bench.emucompare as emucompare

    def no_run(*a, **k):
        raise AssertionError("--plan-only ran a server")

    monkeypatch.setattr(emucompare, "sweep_target", no_run)
    out = tmp_path / "plan"
    rc = main(["compare", "--emulate", str(write_profile(tmp_path / "p.json")), "--model", "opt-13b",
               "--workload", "humaneval", "--devices", "2", "--source-limit", "20",
               "--baseline-profile", str(write_profile(tmp_path / "vllm.json", slower=1.5)),
               "--systems", "disaggregated,vllm", "--ttft", "0.1", "--tpot", "0.02", "--plan-only",
               "--rate-factors", "0.5,0.75,1", "--no-progress", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan_only"] and summary["devices"] == 2 and not (out / "results.json").exists()
    for system, d in summary["systems"].items():
        assert Placement.from_dict(d["placement"]).num_devices == d["num_devices"] <= 2
        # --rate-factors: each system is scanned at those multiples of its own simulated goodput
        assert d["simulated_goodput"] > 0 and d["scan_rates"] == list(scan_rates(d["simulated_goodput"], (0.5, 0.75, 1.0)))
    steady = summary["steady_state"]["systems"]
    assert summary["steady_state_disaggregated_over_vllm_ratio"] == pytest.approx(
        steady["disaggregated"]["per_device_goodput"] / steady["vllm"]["per_device_goodput"])
    assert '"plan_only": true' in capsys.readouterr().out


def test_devices_without_emulate_is_refused(tmp_path, capsys):
    assert main(["compare", "--devices", "4", "--out", str(tmp_path)]) == 2
    assert "--devices needs --emulate" in capsys.readouterr().err


def test_rates_and_rate_factors_are_refused_together(tmp_path, capsys):
    assert main(["compare", "--rates", "1,2", "--rate-factors", "0.5,1", "--out", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--rate-factors", "0.5,0", "--out", str(tmp_path)])
    assert "every factor must be > 0" in capsys.readouterr().err


def test_runs_last_the_same_time_at_every_rate(tmp_path):
    """A run at rate r sends r x run_seconds requests (>= min_requests, <= the sample), so a high
    rate is sustained load rather than a burst; the simulator replays exactly that prefix."""
    from dsjax.bench.sweep import SweepConfig, requests_at

    assert requests_at(50.0, 10_000, duration_s=30.0, min_requests=100) == 1500
    assert requests_at(1.0, 10_000, duration_s=30.0, min_requests=100) == 100
    assert requests_at(50.0, 600, duration_s=30.0, min_requests=100) == 600
    assert requests_at(50.0, 600, duration_s=0.0) == 600
    assert SweepConfig(rates=(1.0,), duration_s=60.0, min_requests=5).requests_at(2.5, 1000) == 150
    with pytest.raises(ValueError, match="duration_s"):
        SweepConfig(rates=(1.0,), duration_s=-1.0)
    assert scan_rates(40.0, (0.8, 1.0, 1.25)) == (32.0, 40.0, 50.0)
    with pytest.raises(ValueError, match="no positive goodput"):
        scan_rates(0.0, (1.0,))
    ec = emulated_compare(quick=True, cluster=EmulatedCluster(profile_path=tmp_path / "p.json", model="opt-13b",
                                                              devices=8), out=tmp_path)
    # HumanEval on OPT-66B: ~97 output tokens at a 0.2 s TPOT SLO, a lifetime of ~9.7 s
    assert ec.run_length(97.0, 0.2) == pytest.approx((9.7, 29.7), abs=0.06) and len(ec.compare.rates_factors) == 3
    assert emulated_compare(quick=False, cluster=ec.cluster, out=tmp_path).run_length(97.0, 0.2) == pytest.approx((19.4, 79.4), abs=0.06)
    assert emulated_compare(quick=True, cluster=ec.cluster, out=tmp_path, run_seconds=50.0,
                            settle_s=10.0).run_length(97.0, 0.2) == (10.0, 50.0)
    with pytest.raises(ValueError, match="below run_seconds"):
        emulated_compare(quick=True, cluster=ec.cluster, out=tmp_path, run_seconds=5.0, settle_s=10.0).run_length(97.0, 0.2)
    # --steady-state: 12 lifetimes at the SLO's pace (97 x 0.2 s), the first third settling; two rates, no bisection
    steady = emulated_compare(quick=False, steady=True, cluster=ec.cluster, out=tmp_path)
    assert steady.run_length(97.0, 0.2) == pytest.approx((77.6, 232.8), abs=0.06)
    assert steady.compare.rates_factors == (0.95, 1.1) and steady.compare.max_bisections == 0
    assert steady.run_length(2.0, 0.2) == (20.0, 60.0)


def test_vllm_system_needs_a_baseline_profile(tmp_path):
    cluster = EmulatedCluster(profile_path=write_profile(tmp_path / "p.json"), model="opt-13b", devices=4)
    with pytest.raises(ValueError, match="baseline profile"):
        cluster.profile_for("vllm")
    slower = EmulatedCluster(profile_path=cluster.profile_path, model="opt-13b", devices=4,
                             baseline_profile=write_profile(tmp_path / "v.json", slower=2.0))
    plans = plan_systems(slower, HUMANEVAL_LENGTHS, SLOs(ttft_s=0.05, tpot_s=0.02), ("colocated", "vllm"))
    assert plans["vllm"].placement.mode == "colocated"
    assert plans["vllm"].planner_goodput < plans["colocated"].planner_goodput  # slower kernels serve less


def test_settling_requests_are_load_not_measured(tmp_path):
    """The first settle_s seconds of a run are not measured, by the benchmark (LoadRun.records)
    and by the simulator replaying it (TraceSimulator.settle_s) alike."""
    from dsjax.bench.loadgen import send_schedule
    from dsjax.bench.records import BenchRequest, LoadRun, RequestResult
    from dsjax.bench.metrics import RequestRecord
    from dsjax.bench.simcompare import TraceSimulator
    from dsjax.bench.sweep import SweepConfig, settled_index

    assert settled_index([0.0, 0.5, 1.0, 1.5], 1.0) == 2 and settled_index([0.0, 0.5], 9.0) == 2
    with pytest.raises(ValueError, match="settle_s"):
        SweepConfig(rates=(1.0,), duration_s=10.0, settle_s=10.0)
    results = tuple(RequestResult(index=i, request_id=str(i), scheduled_s=float(i), breakdown=None, server_ttft_s=None,
                                  finish_reason="length",
                                  record=RequestRecord(send_s=float(i), token_times_s=(i + 0.1,), prompt_len=4, output_len=1))
                    for i in range(5))
    run = LoadRun(rate=1.0, results=results, wall_s=5.0, stopped_early=False, send_lag_p99_s=0.0, send_lag_max_s=0.0,
                  measured_from=2)
    assert [r.send_s for r in run.records] == [2.0, 3.0, 4.0] and len(run.results) == 5
    cluster = EmulatedCluster(profile_path=write_profile(tmp_path / "p.json"), model="opt-13b", devices=2)
    plan = plan_systems(cluster, HUMANEVAL_LENGTHS, SLOs(ttft_s=0.05, tpot_s=0.02), ("colocated",))["colocated"]
    sim = TraceSimulator(system="colocated", profile=load_profile(cluster.profile_path), model="opt-13b",
                         slos=SLOs(ttft_s=0.05, tpot_s=0.02), max_num_seqs=256, max_prefill_tokens=1024,
                         placement=plan.placement, config=cluster.sim_config(), memory=cluster.memory())
    reqs = [BenchRequest(index=i, prompt_len=p, output_len=o, prompt_text="x" * p) for i, (p, o) in
            enumerate(HUMANEVAL_LENGTHS[:60])]
    offsets = send_schedule(60, rate=30.0, seed=0)
    whole = sim.result(reqs, offsets)
    sim.settle_s = 1.0
    part = sim.result(reqs, offsets)
    k0 = settled_index(offsets, 1.0)
    assert 0 < k0 < 60 and part.num_requests == 60 - k0
    assert list(part.ttft_s) == list(whole.ttft_s[k0:]) and sim.result_all(reqs, offsets).num_requests == 60
    assert sim.result_all(reqs, offsets[:40]).num_requests == 40  # a run sends a prefix of the sample


def test_ttft_decomposition_separates_bias_from_pairing_noise():
    """Paired engine - simulator percentiles, the unpaired (quantile) difference, the paired mean,
    and the simulator's own noise floor from a jittered replay."""
    import types

    import numpy as np

    from dsjax.bench.emucompare import jitter_offsets, ttft_decomposition
    from dsjax.bench.sweep import SLOs

    rng = np.random.default_rng(0)
    n = 200
    sim_ttft = rng.uniform(0.02, 0.08, n)
    engine_ttft = np.roll(sim_ttft, 1) + 0.003  # the same distribution shifted 3 ms, paired with others
    measured = []
    for i in range(n):
        record = types.SimpleNamespace(ok=True, send_s=0.0, token_times_s=[engine_ttft[i] + 0.001, engine_ttft[i] + 0.05],
                                       num_tokens=2)
        measured.append(types.SimpleNamespace(index=i, record=record, server_ttft_s=engine_ttft[i] + 0.0005,
                                              breakdown=types.SimpleNamespace(queue_s=0.0, prefill_s=engine_ttft[i])))
    sim = types.SimpleNamespace(ttft_s=sim_ttft, attainment=1.0)
    jittered = types.SimpleNamespace(ttft_s=sim_ttft + rng.uniform(-0.01, 0.01, n))
    out = ttft_decomposition(types.SimpleNamespace(measured=measured), sim, SLOs(ttft_s=0.1, tpot_s=0.1), 1.0, jittered)
    assert abs(out["ttft_engine_minus_sim_mean_ms"] - 3.0) < 0.5
    assert all(abs(q - 3.0) < 4.0 for q in out["ttft_engine_vs_sim_quantiles_ms"])
    assert out["ttft_engine_minus_sim_ms"][1] > 15  # pairing other requests: a wide paired p90
    assert 5 < out["ttft_sim_noise_ms"][1] < 10
    assert out["ttft_router_minus_engine_ms"] == [0.5, 0.5] and out["ttft_client_minus_router_ms"] == [0.5, 0.5]
    assert out["engine_side_attainment"] == 1.0
    moved = jitter_offsets([0.0, 0.5, 1.0], seed=1)
    assert moved == sorted(moved) and all(abs(a - b) <= 1e-3 for a, b in zip(moved, [0.0, 0.5, 1.0])) and moved[0] >= 0
