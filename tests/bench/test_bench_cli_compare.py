"""`python -m dsjax.bench` end to end against fake servers: the run command's files, and the compare
experiment's orchestration (SLOs from a profile, per-device goodput ratios, simulator table)."""

import json

import pytest

from dsjax.bench.cli import main
from dsjax.bench.experiment import CompareConfig, auto_rates, obtain_profile, run_compare
from dsjax.bench.regime import derive_slos
from dsjax.bench.servers import ServerOptions
from dsjax.planner.latency import LatencyCoeffs, Profile, save_profile
from tests.support.fake_server import FakeServer, FakeTiming

PNGS = ("attainment_vs_rate.png", "attainment_vs_slo_scale.png", "latency_breakdown.png")


def test_run_command_writes_json_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    with FakeServer(FakeTiming(prefill_fixed_s=0.004, tpot_s=0.001)) as server:
        rc = main(["--target", server.target, "--workload", "humaneval", "--scale", "16", "--num-requests", "12",
                   "--rates", "20,40", "--ttft", "0.5", "--tpot", "0.05", "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["rate"] for r in rows] == [20.0, 40.0] and all(r["attainment_joint"] == 1.0 for r in rows)
    assert (out / "results.csv").read_text().splitlines()[0].startswith("system,rate,num_requests,num_failed,ttft_slo_s")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["goodput"] == 40.0 and summary["saturated"] is True
    assert all((out / p).stat().st_size > 1000 for p in PNGS)
    assert len((out / "requests-server-20.jsonl").read_text().splitlines()) == 12
    assert "goodput 40 req/s (every scanned rate passed)" in capsys.readouterr().out


def test_run_command_reports_an_unreachable_server(tmp_path, capsys):
    rc = main(["--target", "127.0.0.1:1", "--workload", "humaneval", "--num-requests", "2", "--rates", "1",
               "--ttft", "1", "--tpot", "1", "--no-progress", "--connect-timeout", "0.5", "--out", str(tmp_path)])
    assert rc == 2 and "no gRPC server" in capsys.readouterr().err


def test_slo_rule_and_auto_rates():
    slos, how = derive_slos({"prefill_512_ms": 80.0, "decode_bs1_ctx512_ms": 2.5})
    assert slos.ttft_s == pytest.approx(0.28) and slos.tpot_s == pytest.approx(0.0125)
    assert "3.5 x prefill_512_ms" in how["rule"]
    with pytest.raises(ValueError, match="prefill_512_ms"):
        derive_slos({})
    rates = auto_rates({"a": 4.0, "b": 2.0}, factors=(0.5, 1.0, 1.5))
    assert rates == (1.0, 2.4, 6.0)


class _FakeSystem:
    """Stands in for servers.launch_system: two fake replicas (or one 'router') per system."""

    TIMINGS = {"disaggregated": 0.004, "colocated": 0.020, "chunked": 0.015}

    def __init__(self, name, options, log_dir):
        self.name, self.num_devices = name, 2
        self.servers = [FakeServer(FakeTiming(prefill_fixed_s=self.TIMINGS[name], tpot_s=0.001)).start()]
        self.targets = [s.target for s in self.servers]

    def cpu_seconds(self):
        return {"fake": 0.0}

    def describe(self):
        return [{"name": "fake", "pid": 0, "affinity": [0], "threads": 1}]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in self.servers:
            s.stop()


def test_compare_orchestration_with_fake_systems(tmp_path):
    coeffs = LatencyCoeffs(prefill=[2.0, 0.01, 0.0], decode_small=[1.0, 0.0001, 0.01], decode_large=[1.0, 0.0001, 0.01])
    profile_path = tmp_path / "profile.json"
    save_profile(profile_path, Profile(entries={"small-llama": {1: coeffs}},
                                       metadata={"prefill_512_ms": 20.0, "decode_bs1_ctx512_ms": 2.0}))
    cfg = CompareConfig(out=tmp_path / "cmp", model="small-llama", workload="humaneval", scale=16, num_requests=16, rates=(20.0, 80.0),
                        max_bisections=1, rel_tol=0.3, warmup_requests=2, profile=profile_path, progress=False,
                        server=ServerOptions(model="small-llama"))
    summary = run_compare(cfg, log=lambda _: None, launcher=_FakeSystem)
    assert summary["slo"]["ttft_s"] == pytest.approx(0.070) and summary["slo"]["tpot_s"] == pytest.approx(0.010)
    systems = summary["systems"]
    assert set(systems) == {"disaggregated", "colocated", "chunked"}
    for s in systems.values():
        assert s["per_device_goodput"] == pytest.approx(s["goodput"] / 2) and s["simulated_goodput"] > 0
    # Capacity 250 vs 50 req/s against 80 req/s: disaggregated passes the top rate, colocated fails it.
    assert systems["disaggregated"]["goodput"] == 80.0, systems["disaggregated"]["probes"]
    assert systems["colocated"]["goodput"] < 80.0, systems["colocated"]["probes"]
    ratio = summary["ratios"]["disaggregated_over_colocated"]
    assert ratio == pytest.approx(systems["disaggregated"]["goodput"] / systems["colocated"]["goodput"])
    # The headline keys: measured and simulated ratios side by side, and the regime of the run.
    assert summary["disaggregated_over_colocated_ratio"] == ratio
    sim = summary["simulated_disaggregated_over_colocated_ratio"]
    assert sim == pytest.approx(systems["disaggregated"]["simulated_goodput"] / systems["colocated"]["simulated_goodput"])
    assert summary["per_device_goodput"] == {s: d["per_device_goodput"] for s, d in systems.items()}
    assert summary["regime"]["prefill_over_decode"] == pytest.approx(10.0)
    step = summary["regime"]["decode_step_ms_ctx512"]
    assert step["1"] < step["8"] < step["32"]  # this fake profile's decode grows with the batch
    assert {f["system"] for f in summary["fidelity"]} == set(systems)
    out = tmp_path / "cmp"
    assert all((out / p).stat().st_size > 1000 for p in PNGS)
    assert "| disaggregated | 2 |" in (out / "summary.md").read_text()
    rows = json.loads((out / "results.json").read_text())
    assert {r["system"] for r in rows} == set(systems) and all(r["devices"] == 2 for r in rows)
    # `python -m dsjax.bench report DIR` re-draws everything from the saved files alone.
    first = (out / "summary.md").read_text()
    for p in PNGS:
        (out / p).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.md").read_text() == first and all((out / p).is_file() for p in PNGS)


def test_regimes_command_reads_profiles_side_by_side(tmp_path, capsys):
    flat = LatencyCoeffs(prefill=[10.0, 0.1, 0.0], decode_small=[20.0, 0.0, 0.0], decode_large=[20.0, 0.0, 0.0])
    steep = LatencyCoeffs(prefill=[1.0, 0.2, 0.0], decode_small=[1.0, 0.0, 1.0], decode_large=[1.0, 0.0, 1.0])
    for name, coeffs in (("flat", flat), ("steep", steep)):
        save_profile(tmp_path / f"{name}.json", Profile(entries={"small-llama": {1: coeffs}}, metadata={}))
    plot = tmp_path / "regimes.png"
    assert main(["regimes", f"bandwidth-bound={tmp_path / 'flat.json'}", f"compute-bound={tmp_path / 'steep.json'}:small-llama",
                 "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    # flat: a 512-token prefill is 10 + 51.2 = 61.2 ms = 3.1 steps of 20 ms, whatever the batch
    assert "| bandwidth-bound | 61.2 ms | 20.0 / 20.0 / 20.0 / 20.0 / 20.0 / 20.0 | 3.1 | 1.00 |" in table
    # steep: decode = 1 + 1 ms per request, so batch 32 costs 33 / 2 = 16.5x batch 1
    assert "| compute-bound | 103.4 ms | 2.0 / 3.0 / 5.0 / 9.0 / 17.0 / 33.0 | 51.7 | 16.50 |" in table
    assert plot.stat().st_size > 1000


def test_cached_profile_is_keyed_by_the_step_code(tmp_path, monkeypatch):
    """A profile cached by other engine code is not reused: the cache name carries a digest of
    models/, pallas_kernels/ and dsjax/runtime/, which changes when any of them does."""
    import dsjax.bench.experiment as experiment

    monkeypatch.setattr(experiment, "DEFAULT_CACHE", tmp_path)
    cfg = CompareConfig(model="tiny-llama", out=tmp_path / "out")
    digest = experiment.step_code_digest()
    assert len(digest) == 12 and int(digest, 16) >= 0 and digest == experiment.step_code_digest()
    cached = tmp_path / "bench" / f"profile-tiny-llama-{cfg.server.dtype}-{'quick' if cfg.quick_profile else 'full'}-1core-{digest}.json"
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    assert obtain_profile(cfg, log=lambda _: None) == cached
    monkeypatch.setattr(experiment, "step_code_digest", lambda: "0" * 12)  # as if the code changed
    monkeypatch.setattr(experiment.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("would profile")))
    with pytest.raises(RuntimeError, match="would profile"):
        obtain_profile(cfg, log=lambda _: None)
