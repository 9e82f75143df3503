"""`python -m dsjax.bench capacity` (dsjax/bench/capacity.py, capacity_stats.py): the helpers on
their own, and a small run through a real router and worker processes on 4 emulated devices."""

import json
import math
import os

import pytest

from dsjax.bench import capacity_stats as cs
from dsjax.bench.capacity import CapacityConfig, make_requests, placement, scaled_profile
from dsjax.bench.cli import main

# OPT-13B TP1 as DistServe's A100 profile fits it (ms): a 16-token prefill ~20 ms, a decode step ~20 ms.
A100_13B_TP1 = {"prefill": [18.1, 0.1019, 7.12e-6], "decoding_smallbs": [19.93, 6.27e-4, 0.0385],
                "decoding_largebs": [7.17, 5.8e-4, 0.158], "decoding_large_small_bs_threshold": 95}


def write_profile(path):
    path.write_text(json.dumps({"facebook/opt-13b": {"1": A100_13B_TP1}}))
    return path


def test_scaled_profile_divides_every_coefficient(tmp_path):
    src = write_profile(tmp_path / "p.json")
    assert scaled_profile(src, 1.0, tmp_path / "x.json") == src
    scaled = json.loads(scaled_profile(src, 10.0, tmp_path / "x10.json").read_text())["facebook/opt-13b"]["1"]
    assert scaled["prefill"][0] == pytest.approx(1.81) and scaled["decoding_large_small_bs_threshold"] == 95


def test_config_placement_and_requests(tmp_path):
    cfg = CapacityConfig(profile=tmp_path / "p.json", devices=32, prompt_len=8, output_len=4)
    p = placement(cfg)
    assert (p.prefill.replicas, p.decode.replicas, p.prefill.tp, p.num_devices) == (16, 16, 1, 32)
    assert placement(CapacityConfig(profile=tmp_path, devices=4, prefill_replicas=1)).decode.replicas == 3
    reqs = make_requests(3, cfg, vocab=1000)
    assert [len(r.prompt_token_ids) for r in reqs] == [8] * 3 and all(r.output_len == 4 for r in reqs)
    with pytest.raises(ValueError, match="both phases"):
        CapacityConfig(profile=tmp_path, devices=4, prefill_replicas=4)
    with pytest.raises(ValueError, match="rate-step"):
        CapacityConfig(profile=tmp_path, rate_step=1.0)


def test_cpu_use_groups_processes():
    a = {"wall": 0.0, "procs": {"router": 1.0, "prefill-0": 0.5, "decode-0": 0.2}, "client": 3.0, "machine": 10.0}
    b = {"wall": 2.0, "procs": {"router": 2.0, "prefill-0": 0.7, "decode-0": 0.8}, "client": 3.4, "machine": 14.0}
    use = cs.cpu_use(a, b)
    assert use["processes"] == {"router": 0.5, "prefill-0": 0.1, "decode-0": 0.3}
    g = use["groups"]
    assert (g["router"], g["prefill workers"], g["decode workers"], g["client"]) == (0.5, 0.1, 0.3, 0.2)
    assert g["other processes"] == pytest.approx(2.0 - 1.1) and use["machine_busy"] == 2.0
    assert use["busiest_worker"] == {"name": "decode-0", "cores": 0.3}


def test_process_tree_and_threads_of_this_process():
    me = os.getpid()
    assert me in cs.descendants(me)
    sample = cs.CPUSampler(me).sample()
    assert sample["procs"]["router"] > 0 and sample["client"] > 0  # the root is named router
    assert sum(cs.thread_cpu(me).values()) > 0


def test_summarize_pyspy_raw(tmp_path):
    raw = tmp_path / "raw.txt"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cs.__file__))))
    raw.write_text(
        f"_bootstrap (/usr/lib/python3.11/threading.py:1002);Generate ({root}/serving/router.py:52);"
        "_serialize (/x/site-packages/grpc/_common.py:40) 30\n"
        f"_bootstrap (/usr/lib/python3.11/threading.py:1002);Generate ({root}/serving/router.py:60) 10\n"
        "garbage line\n")
    s = cs.summarize_pyspy(raw, seconds=1.0)
    assert s["samples"] == 40 and s["gil_held_fraction"] == 0.4
    assert s["self_by_file"] == [["grpc/_common.py", 0.75], ["serving/router.py", 0.25]]
    assert dict(s["inclusive_project"]) == {"Generate (serving/router.py)": 1.0}
    assert dict(s["inclusive_by_function"]) == {"_serialize (grpc/_common.py)": 0.75}  # no roots (every sample)


def test_small_capacity_run_end_to_end(tmp_path, capsys):
    """4 emulated devices (router + 4 worker processes), 2 rates, a few requests each: every key,
    a CPU figure for every process, and added latencies that are sane next to the devices' time."""
    out = tmp_path / "cap"
    rc = main(["capacity", "--emulate", str(write_profile(tmp_path / "p.json")), "--model", "opt-13b", "--devices", "4",
               "--rates", "4,8", "--duration", "1.5", "--min-requests", "6", "--prompt-len", "16", "--output-len", "6",
               "--profile-seconds", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("config", "placement", "machine", "idle_cpu", "ready_s", "capacity_rate", "saturated", "at_capacity",
                "rows", "router_profile", "wall_s"):
        assert key in s, key
    assert [r["rate"] for r in s["rows"]] == [4.0, 8.0]
    for r in s["rows"]:
        assert 0 <= r["attainment_joint"] <= 1 and r["num_failed"] == 0
        assert set(r["cpu"]["processes"]) == {"router", "prefill-0", "prefill-1", "decode-0", "decode-1"}
        g = r["cpu"]["groups"]
        assert 0 < g["router"] < r["cpu"]["cpus"] and g["prefill workers"] > 0 and g["decode workers"] > 0
        assert g["client"] > 0 and g["other processes"] >= 0
        o = r["overhead"]
        assert o["sim_attainment"] == 1.0 and 15 < o["device_tpot_ms"]["p50"] < 30  # ~20 ms decode steps
        for key in ("ttft_overhead_ms", "tpot_overhead_ms"):
            assert o[key]["p50"] <= o[key]["p99"] and -10 < o[key]["p50"] < 5000, (key, o[key])
        assert set(o["ttft_parts_ms"]) == {"engine_minus_sim", "router_minus_engine", "client_minus_router"}
        assert all(math.isfinite(v) for v in o["p99_over_slo"].values())
    prof = s["router_profile"]
    assert prof["rate"] == s["capacity_rate"] or s["capacity_rate"] == 0
    assert prof["thread_cores"] and isinstance(prof["pyspy"], (dict, str))
    assert (out / "capacity.png").stat().st_size > 10_000 and "| req/s |" in (out / "summary.md").read_text()
    assert "capacity" in capsys.readouterr().out


def test_stream_interval_reaches_the_worker_processes():
    """`--workers processes --stream-interval-ms T`: the decode workers hold their streams' later
    tokens (the router relays their messages as they come), as an in-process server does."""
    from dsjax.serve import parse_args
    from serving.launcher import _worker_argv

    argv = _worker_argv(parse_args(["--workers", "processes", "--stream-interval-ms", "200"]), "decode", "d-0", "x:1")
    assert parse_args(argv).stream_interval_ms == 200.0
    assert "--stream-interval-ms" not in _worker_argv(parse_args(["--workers", "processes"]), "decode", "d-0", "x:1")
