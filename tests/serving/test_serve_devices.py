"""`python -m dsjax.serve` over real loopback gRPC on 1 and 2 fake CPU devices (XLA_FLAGS set in
the server's environment): with no --mode it serves colocated on one device and disaggregated on
two; `--attention-backend` picks the attention path, and the step log names the one each step ran.
"""

import contextlib
import json
import os
import subprocess
import sys

import grpc

from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc
from serving.step_log import read_step_log
from tests.support.serving import REPO, debug_instances, free_port, launch_server, stop_server, wait_serving

CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@contextlib.contextmanager
def serving(log_path, devices: int, *flags: str):
    """A server on `devices` CPU devices; yields (gRPC port, metrics port); exits cleanly after."""
    port, metrics_port = free_port(), free_port()
    args = ["--port", str(port), "--metrics-port", str(metrics_port), "--http-port", "0", "--compilation-cache", CACHE_DIR]
    proc = launch_server(args + list(flags), log_path, env=_env(devices))
    try:
        try:
            wait_serving(f"localhost:{port}", timeout=120, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{log_path.read_text()[-3000:]}") from None
        yield port, metrics_port
    finally:
        stop_server(proc)
    assert proc.returncode == 0, log_path.read_text()[-3000:]


def generate(port: int, max_tokens: int) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[256, 5, 6, 7, 8]),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        return [t for m in dsjax_pb2_grpc.GenerationStub(channel).Generate(request, timeout=300) for t in m.token_ids]


def roles(metrics_port: int) -> dict[str, str]:
    doc = debug_instances(metrics_port)
    return {i["worker_id"]: i["role"] for i in doc["instances"]}


def step_records(step_dir) -> list[dict]:
    return [r for path in sorted(step_dir.glob("*.jsonl")) for r in read_step_log(path)]


def test_one_device_serves_colocated_with_the_xla_backend(tmp_path):
    log, steps = tmp_path / "serve.log", tmp_path / "steps"
    with serving(log, 1, "--attention-backend", "xla", "--step-log", str(steps)) as (port, metrics_port):
        assert len(generate(port, 4)) == 4
        assert roles(metrics_port) == {"engine-0": "COLOCATED"}
    text = log.read_text()
    assert "1 device: serving colocated (disaggregation needs a device per phase" in text
    assert "attention backend xla" in text
    records = step_records(steps)
    assert {c["kind"] for r in records for c in r["calls"]} == {"prefill", "decode"}
    assert {r["backend"] for r in records} == {"xla"}


def test_two_devices_serve_disaggregated(tmp_path):
    """No --model: the packaged tiny-chat checkpoint (models/checkpoints), its real weights and tokenizer."""
    log = tmp_path / "serve.log"
    with serving(log, 2) as (port, metrics_port):
        assert len(generate(port, 4)) == 4
        assert roles(metrics_port) == {"prefill-0": "PREFILL", "decode-0": "DECODE"}
    text = log.read_text()
    assert "serving colocated" not in text
    assert "tiny-chat disaggregated ready" in text and "attention backend xla" in text  # auto on CPU: XLA


def test_pallas_backend_serves_on_cpu(tmp_path):
    """The kernels, interpreted on CPU: one short request (one prefill, one decode step), no warm-up."""
    log, steps = tmp_path / "serve.log", tmp_path / "steps"
    with serving(log, 1, "--attention-backend", "pallas", "--step-log", str(steps), "--no-warmup") as (port, _):
        assert len(generate(port, 2)) == 2
    records = step_records(steps)
    assert {c["kind"] for r in records for c in r["calls"]} == {"prefill", "decode"}
    assert {r["backend"] for r in records} == {"pallas"}


def test_disaggregated_on_one_device_is_a_clear_error(tmp_path):
    env = dict(_env(1), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "dsjax.serve", "--mode", "disaggregated", "--port", "0", "--http-port", "0",
                          "--metrics-port", "-1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "mode disaggregated needs 2 devices (prefill and decode each on devices of their own) and jax sees 1 cpu device" \
        in out.stderr, out.stderr[-3000:]
