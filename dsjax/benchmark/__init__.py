"""The serving benchmark: a gRPC load generator, goodput sweeps, plots, and the headline experiment.

    requests = load_bench_requests("sharegpt", num_requests=200, scale=4)
    run = run_load("localhost:50051", requests, send_schedule(len(requests), rate=4.0), rate=4.0)
    sweep = sweep_target("localhost:50051", requests, SweepConfig(rates=(2, 4, 8)), SLOs(ttft_s=0.33, tpot_s=0.011))

`python -m dsjax.bench` is the command line (cli.py); `experiment.py` runs the comparison of the three
systems (`python -m dsjax.bench compare`); docs/results.md has the results. The load-generator path
imports neither jax nor matplotlib.
"""

from dsjax.benchmark.analysis import SLOs, mean_breakdown, run_row, search_goodput, slo_scale_curve
from dsjax.benchmark.fake_server import FakeServer, FakeTiming
from dsjax.benchmark.loadgen import Breakdown, LoadRun, RequestResult, StopRule, run_load, run_load_async, send_schedule
from dsjax.benchmark.prompts import PROMPT_FORMATS, BenchRequest, load_bench_requests, to_bench_requests
from dsjax.benchmark.sweep import SweepConfig, SweepResult, sweep_target

__all__ = [
    "PROMPT_FORMATS", "SLOs", "BenchRequest", "Breakdown", "FakeServer", "FakeTiming", "LoadRun", "RequestResult",
    "StopRule", "SweepConfig", "SweepResult", "load_bench_requests", "mean_breakdown", "run_load", "run_load_async",
    "run_row", "search_goodput", "send_schedule", "slo_scale_curve", "sweep_target", "to_bench_requests",
]
