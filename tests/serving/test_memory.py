"""Resident memory under minutes of load stays flat once the server is warm (slow).

A server compiles one program per padded shape it meets (dsjax/engine/shapes.py), and each
compiled shape stays resident: with `--warmup-shapes` all of them are compiled before serving, so
from then on nothing may grow: no per-request records, step logs, channels or caches. Measured on
the router and worker processes together (tests/support/rss.py), tiny-llama, a mixed client load
of sampled requests; the median of the last minute against the first, after a minute of warm-up."""

import os
import statistics

import pytest

from tests.support.rss import Load, measure_rss
from tests.support.serving import free_port, launch_server, stop_server, wait_serving

CACHE_DIR = os.path.expanduser("~/.cache/dsjax/jax-tests")
SYSTEMS = {
    "colocated": ["--workers", "inprocess", "--mode", "colocated"],
    "chunked": ["--workers", "inprocess", "--mode", "chunked"],
    "processes": ["--workers", "processes", "--decode-replicas", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("system", SYSTEMS)
def test_rss_is_flat_after_warm_up(tmp_path, system):
    port = free_port()
    args = ["--model", "tiny-llama", "--port", str(port), "--http-port", "0", "--metrics-port", "-1", "--max-model-len", "256",
            "--max-prefill-tokens", "256", "--warmup-shapes", "--compilation-cache", CACHE_DIR, "--log-dir", str(tmp_path),
            "--log-level", "WARNING", *SYSTEMS[system]]
    proc = launch_server(args, tmp_path / "server.log")
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, timeout=600, proc=proc)
        load = Load(target, clients=6, max_prompt=190)  # prompt + up to 63 tokens within the 256 context
        try:
            measure_rss(proc.pid, 60, every_s=10)  # warm-up: first batches, lazily made state
            samples = measure_rss(proc.pid, 180, every_s=10)
        finally:
            load.stop()
    finally:
        stop_server(proc, timeout=20)
    totals = [sum(s.values()) for _, s in samples]
    first, last = statistics.median(totals[:6]), statistics.median(totals[-6:])
    print(f"{system}: RSS {first:.0f} -> {last:.0f} MiB over 3 min ({[round(t) for t in totals]}); "
          f"{load.done} requests, {load.failed} failed")
    assert load.done > 200 and load.failed == 0
    assert last - first < max(40.0, 0.05 * first), totals
