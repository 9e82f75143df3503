"""`python -m dsjax.serve` with no model arguments (tiny-llama, in-process disaggregated on two
devices) answers health checks within 60 s and streams to `python -m dsjax.client`."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from tests.support.serving import REPO, debug_instances, free_port, launch_server, stop_server, wait_serving


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


def default_tokenizer():
    from models.checkpoints import DEFAULT_MODEL, ROOT
    from models.hf_config import load_hf_config
    from models.tokenizer import load_tokenizer

    return load_tokenizer(ROOT / DEFAULT_MODEL, load_hf_config(ROOT / DEFAULT_MODEL))


def test_default_server_streams_to_the_client(default_server):
    port, metrics_port, startup_s, _ = default_server
    assert startup_s < 60
    out = client("--target", f"localhost:{port}", "--wait", "10", "Hello, disaggregation", "--max-tokens", "12",
                 "--temperature", "0", "--ignore-eos", "--show-tokens")
    assert out.returncode == 0, out.stderr
    assert "[LENGTH] 12 tokens" in out.stderr and "token_ids: [" in out.stderr
    ids = json.loads(out.stderr.split("token_ids: ")[1].splitlines()[0])
    # The same prompt as token ids, encoded by the default checkpoint's own tokenizer (BOS first).
    prompt_ids = default_tokenizer().encode("Hello, disaggregation")
    assert prompt_ids[0] == 0 and len(prompt_ids) < len("Hello, disaggregation")  # BPE, not bytes
    again = client("--target", f"localhost:{port}", "--token-ids", ",".join(map(str, prompt_ids)),
                   "--max-tokens", "12", "--temperature", "0", "--ignore-eos", "--show-tokens")
    assert again.returncode == 0 and json.loads(again.stderr.split("token_ids: ")[1].splitlines()[0]) == ids
    doc = debug_instances(metrics_port)
    roles = {i["worker_id"]: i["role"] for i in doc["instances"]}
    assert roles == {"prefill-0": "PREFILL", "decode-0": "DECODE"}
    for stranger in (None, "not-the-token"):  # workers' addresses and pids: the cluster's only
        with pytest.raises(urllib.error.HTTPError, match="401"):
            debug_instances(metrics_port, token=stranger)
    assert all(i["free_blocks"] == i["num_blocks"] for i in doc["instances"])
    metrics = urllib.request.urlopen(f"http://localhost:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'dsjax_requests_total{finish_reason="length"} 2.0' in metrics
    # the router process's garbage-collection pauses: at least the full collection before the freeze
    full = re.search(r'^dsjax_gc_collections_total\{generation="2"\} (\S+)$', metrics, re.M)
    assert full and float(full.group(1)) >= 1
    assert re.search(r'^dsjax_gc_pause_max_seconds\{generation="2"\} (\S+)$', metrics, re.M)


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


def test_attention_backend_flag_reaches_the_workers():
    from dsjax.serve import ATTENTION_BACKENDS, parse_args
    from models.attention import BACKENDS
    from serving.launcher import _worker_argv

    assert set(ATTENTION_BACKENDS) == set(BACKENDS)
    assert parse_args([]).attention_backend == "auto"
    with pytest.raises(SystemExit) as e:
        parse_args(["--attention-backend", "cuda"])  # argparse: invalid choice, exit status 2
    assert e.value.code == 2
    for name in ATTENTION_BACKENDS:
        argv = _worker_argv(parse_args(["--attention-backend", name]), "decode", "decode-0", "127.0.0.1:1")
        assert parse_args(argv).attention_backend == name


def test_auto_is_the_platforms_fixed_path():
    import jax

    from dsjax.runtime.builder import load_causal_lm, platform_backend
    from serving.validation import model_config
    from serving.worker import model_backend

    platform = "pallas" if jax.default_backend() == "gpu" else "xla"
    assert platform_backend(model_config("tiny-llama")) == platform
    assert platform_backend(SimpleNamespace(sliding_window=8)) == "xla"  # the kernels take no window
    assert [model_backend(b) for b in ("auto", "pallas", "xla")] == [None, "pallas", "xla"]
    assert load_causal_lm("tiny-llama", dummy_weights=True, backend=model_backend("auto"))[0].backend == platform
    with pytest.raises(ValueError, match="attention_backend='cuda'"):
        load_causal_lm("tiny-llama", dummy_weights=True, backend="cuda")


def test_default_mode_follows_the_devices(tmp_path):
    """No --mode: one device serves colocated, two or more disaggregated; --mode and a plan's mode
    win, and a placement with too few devices exits naming the fix."""
    from dsjax.engine.placement import PhaseParallel, Placement, save_plan
    from dsjax.serve import parse_args, placement_from_args
    from serving.launcher import _fit_devices

    one, two = [SimpleNamespace(platform="cpu")], [SimpleNamespace(platform="cpu")] * 2

    def fit(flags, devices):
        args = parse_args(flags)
        return _fit_devices(args, placement_from_args(args), devices)

    assert fit([], one) == Placement(prefill=PhaseParallel(), decode=PhaseParallel(), mode="colocated")
    assert fit([], two).mode == "disaggregated"
    assert fit(["--mode", "chunked"], two).mode == "chunked"
    with pytest.raises(SystemExit, match=r"mode disaggregated needs 2 devices .* jax sees 1 cpu device: serve --mode colocated"):
        fit(["--mode", "disaggregated"], one)
    with pytest.raises(SystemExit, match=r"mode colocated needs 2 devices .* lower --prefill-tp"):
        fit(["--prefill-tp", "2"], one)
    with pytest.raises(SystemExit, match=r"jax sees 1 gpu device: serve --mode colocated or --mode chunked, or give"):
        fit(["--mode", "disaggregated"], [SimpleNamespace(platform="gpu")])
    plan = tmp_path / "plan.json"
    save_plan(plan, Placement(prefill=PhaseParallel(), decode=PhaseParallel()), goodput=1.0)
    with pytest.raises(SystemExit, match="mode disaggregated needs 2 devices"):
        fit(["--plan", str(plan)], one)
