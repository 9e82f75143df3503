"""`python -m dsjax.serve` with no model arguments (tiny-llama, in-process disaggregated on two
devices) answers health checks within 60 s and streams to `python -m dsjax.client`."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.support.serving import REPO, free_port, launch_server, stop_server, wait_serving


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("launcher") / "serve.log"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # as on a fresh shell: the launcher makes its two devices itself
    proc = launch_server(["--port", str(port), "--metrics-port", str(metrics_port), "--http-port", str(http_port)], log, env=env)
    try:
        startup_s = wait_serving(f"localhost:{port}", timeout=60, proc=proc)
        yield port, metrics_port, startup_s, proc
    finally:
        stop_server(proc)
        assert proc.returncode == 0, log.read_text()[-3000:]


def client(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "dsjax.client", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_default_server_streams_to_the_client(default_server):
    port, metrics_port, startup_s, _ = default_server
    assert startup_s < 60
    out = client("--target", f"localhost:{port}", "--wait", "10", "Hello, disaggregation", "--max-tokens", "12",
                 "--temperature", "0", "--ignore-eos", "--show-tokens")
    assert out.returncode == 0, out.stderr
    assert "[LENGTH] 12 tokens" in out.stderr and "token_ids: [" in out.stderr
    ids = json.loads(out.stderr.split("token_ids: ")[1].splitlines()[0])
    again = client("--target", f"localhost:{port}", "--token-ids", ",".join(map(str, [256, *b"Hello, disaggregation"])),
                   "--max-tokens", "12", "--temperature", "0", "--ignore-eos", "--show-tokens")
    assert again.returncode == 0 and json.loads(again.stderr.split("token_ids: ")[1].splitlines()[0]) == ids
    doc = json.loads(urllib.request.urlopen(f"http://localhost:{metrics_port}/debug/instances", timeout=5).read())
    roles = {i["worker_id"]: i["role"] for i in doc["instances"]}
    assert roles == {"prefill-0": "PREFILL", "decode-0": "DECODE"}
    assert all(i["free_blocks"] == i["num_blocks"] for i in doc["instances"])
    metrics = urllib.request.urlopen(f"http://localhost:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'dsjax_requests_total{finish_reason="length"} 2.0' in metrics


def test_client_reports_errors(default_server):
    port = default_server[0]
    out = client("--target", f"localhost:{port}", "hi", "--max-tokens", "0")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "max_tokens" in out.stderr


def test_placement_from_flags_and_plan(tmp_path):
    from dsjax.engine.placement import PhaseParallel, Placement, save_plan
    from dsjax.serve import parse_args, placement_from_args
    from serving.supervisor import assign_gpus, xla_flags_with_devices

    p = placement_from_args(parse_args([]))
    assert p == Placement(prefill=PhaseParallel(), decode=PhaseParallel(), mode="disaggregated") and p.num_devices == 2
    p = placement_from_args(parse_args(["--prefill-tp", "2", "--decode-replicas", "3"]))
    assert (p.prefill.tp, p.decode.tp, p.decode.replicas) == (2, 1, 3)
    plan = tmp_path / "plan.json"
    save_plan(plan, Placement(prefill=PhaseParallel(tp=4), decode=PhaseParallel(tp=2, pp=2)), goodput=1.5)
    p = placement_from_args(parse_args(["--plan", str(plan)]))
    assert (p.prefill.tp, p.decode.tp, p.decode.pp, p.mode) == (4, 2, 2, "disaggregated")
    p = placement_from_args(parse_args(["--plan", str(plan), "--mode", "colocated", "--prefill-replicas", "2"]))
    assert p.mode == "colocated" and p.decode == p.prefill == PhaseParallel(tp=4, replicas=2)
    assert xla_flags_with_devices("--a=1 --xla_force_host_platform_device_count=8", 2) == "--a=1 --xla_force_host_platform_device_count=2"
    assert assign_gpus([2, 1, 1], 4) == [(0, 1), (2,), (3,)]
    with pytest.raises(ValueError, match="need 5 GPUs"):
        assign_gpus([4, 1], 4)
