"""The real systems as the headline experiment starts them: pinned server processes of tiny-llama
answering the load generator (slow: starts jax in several processes)."""

import os

import pytest

from dsjax.bench.loadgen import run_load
from dsjax.bench.prompts import load_bench_requests
from dsjax.bench.servers import ServerOptions, launch_system

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("system", ["disaggregated", "colocated"])
def test_launched_system_serves_pinned(system, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to pin the two devices to")
    cores = tuple(sorted(os.sched_getaffinity(0))[:2])
    options = ServerOptions(model="tiny-llama", cores=cores, max_prefill_tokens=128, ready_timeout_s=300)
    requests = load_bench_requests("humaneval", num_requests=4, seed=0, scale=8, max_total_len=512)
    with launch_system(system, options, tmp_path / "logs") as launched:
        pinned = {d["name"]: d["affinity"] for d in launched.describe() if d["name"] != "router"}
        assert sorted(pinned.values()) == [[cores[0]], [cores[1]]]
        run = run_load(launched.targets, requests, [0.0, 0.05, 0.1, 0.15], rate=20.0, progress=False)
    assert all(r.record.ok and r.record.num_tokens == r.record.output_len for r in run.results), [
        r.record.error for r in run.results]
    assert all(r.breakdown is not None and r.breakdown.prefill_s > 0 for r in run.results)
    if system == "disaggregated":
        assert all(r.breakdown.kv_bytes > 0 for r in run.results)
