"""Slow motion (`compare --time-scale K`, `serve --emulate-time-scale K`): the emulated cluster
runs K x slower in wall time, the client sends K x slower and reads every run back at 1/K, so what
is reported is the cluster at full speed (dsjax/bench/records.py LoadRun.time_scaled, sweep.py)."""

import json

import pytest

from dsjax.bench.cli import main
from dsjax.bench.emulated_setup import EmulatedCluster, server_argv
from dsjax.bench.metrics import RequestRecord
from dsjax.bench.records import Breakdown, LoadRun, RequestResult
from dsjax.engine.placement import Placement
from dsjax.serve import parse_args
from tests.bench.test_emulated_compare import write_profile


def test_a_run_read_back_scales_every_duration_and_no_count():
    rec = RequestRecord(send_s=1.0, token_times_s=(1.5, 2.0, 4.0), prompt_len=10, output_len=3)
    bd = Breakdown(queue_s=0.1, prefill_s=0.3, transfer_s=0.02, decode_s=2.0, kv_bytes=4096, num_recomputes=1)
    res = RequestResult(index=7, request_id="r7", scheduled_s=0.9, record=rec, breakdown=bd, server_ttft_s=0.45,
                        finish_reason="length")
    run = LoadRun(rate=5.0, results=(res, res), wall_s=12.0, stopped_early=False, send_lag_p99_s=0.004,
                  send_lag_max_s=0.01, started_at=1234.5, measured_from=1,
                  server_counters={"continued_steps": 30.0, "host_gap_seconds": 0.6, "leases_expired": 2.0})
    got = run.time_scaled(0.5)
    r = got.results[0]
    assert (r.scheduled_s, r.record.send_s, r.record.token_times_s, r.server_ttft_s) == (0.45, 0.5, (0.75, 1.0, 2.0), 0.225)
    assert (r.breakdown.queue_s, r.breakdown.prefill_s, r.breakdown.transfer_s, r.breakdown.decode_s) == (0.05, 0.15, 0.01, 1.0)
    assert (r.breakdown.kv_bytes, r.breakdown.num_recomputes, r.index, r.record.prompt_len) == (4096, 1, 7, 10)
    assert (got.rate, got.wall_s, got.send_lag_p99_s, got.send_lag_max_s, got.started_at, got.measured_from) == \
        (5.0, 6.0, 0.002, 0.005, 1234.5, 1)
    assert got.server_counters == {"continued_steps": 30.0, "host_gap_seconds": 0.3, "leases_expired": 2.0}
    assert run.time_scaled(1) is run


def test_the_servers_are_told_the_scale_and_the_stream_interval_in_wall_time(tmp_path):
    cluster = EmulatedCluster(profile_path=write_profile(tmp_path / "p.json"), model="opt-13b", devices=2,
                              stream_interval_ms=500.0, time_scale=4.0)
    args = parse_args(server_argv("colocated", Placement.colocated(tp=1, replicas=2), cluster, tmp_path / "plan.json", 1))
    assert (args.emulate_time_scale, args.stream_interval_ms) == (4.0, 2000.0)
    with pytest.raises(ValueError, match="time_scale"):
        EmulatedCluster(profile_path=tmp_path / "p.json", model="opt-13b", devices=2, time_scale=0)


def test_a_slow_motion_run_reports_the_cluster_at_full_speed(tmp_path):
    """A real server in slow motion x3: its runs take >= 3x their full-speed length in wall time,
    and what is reported (read back at 1/3) matches the simulator at full speed."""
    out = tmp_path / "slow"
    rc = main(["compare", "--emulate", str(write_profile(tmp_path / "p.json")), "--model", "opt-13b",
               "--workload", "humaneval", "--devices", "2", "--num-requests", "6", "--source-limit", "20",
               "--systems", "disaggregated", "--rates", "20,60", "--max-bisections", "0", "--settle-seconds", "0",
               "--ttft", "0.1", "--tpot", "0.02", "--time-scale", "3", "--no-progress", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["emulation"]["cluster"]["time_scale"] == 3.0
    rows = summary["fidelity"]
    assert [f["rate"] for f in rows] == [20.0, 60.0]
    for f in rows:  # read back at full speed: the simulator's latencies, not 3x them (a p90 of six
        # requests is their slowest but one: one host hiccup of a few ms moves it, hence the slack)
        sim_ttft, sim_tpot = f["sim_ttft_p90_s"], f["sim_tpot_p90_s"]
        assert 0.7 * sim_ttft - 2e-3 <= f["real_ttft_p90_s"] <= 1.5 * sim_ttft + 2e-3 < 3 * sim_ttft
        assert f["real_tpot_p90_s"] == pytest.approx(sim_tpot, rel=0.3, abs=1e-3)
    # ... while the server ran 3x slower: each run's last token, read back, came >= 1/3 of its wall time in
    last = [max(max(r["token_times_s"]) for r in map(json.loads, p.read_text().splitlines()))
            for p in sorted(out.glob("requests-disaggregated-*.jsonl"))]
    assert len(last) == 2 and summary["systems"]["disaggregated"]["sweep_wall_s"] >= 3 * sum(last)
