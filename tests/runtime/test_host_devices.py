import os
import sys

from dsjax.runtime.host_devices import ensure_host_devices


def test_fake_devices_are_requested_only_before_jax(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert "jax" in sys.modules  # the test session imported it already: too late, leave it alone
    assert not ensure_host_devices(4)
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.delitem(sys.modules, "jax")
    assert not ensure_host_devices(1)
    assert "XLA_FLAGS" not in os.environ
    assert ensure_host_devices(4)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_force_host_platform_device_count=8")
    assert not ensure_host_devices(2)  # an operator's count wins
    assert os.environ["XLA_FLAGS"].endswith("count=8")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
    assert ensure_host_devices(2)
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=0 --xla_force_host_platform_device_count=2"


def test_engine_benchmark_asks_for_two_devices_before_jax():
    import subprocess

    code = ("import os, sys; from dsjax.bench.cli import FORWARDED, ensure_host_devices; "
            "ensure_host_devices(FORWARDED['engine'][2]); import jax; print(jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "2"
