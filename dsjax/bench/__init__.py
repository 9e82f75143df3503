"""The benchmarks: the serving benchmark (load generator, SLO metrics, goodput sweeps, the headline
comparison, simulator fidelity) and the micro-benchmarks (engine steps, kernels, KV transfer, the
latency profiler).

    requests = load_bench_requests("sharegpt", num_requests=200, scale=4)          # prompts.py
    run = run_load("localhost:50051", requests, send_schedule(len(requests), rate=4.0), rate=4.0)
    sweep = sweep_target("localhost:50051", requests, SweepConfig(rates=(2, 4, 8)), SLOs(ttft_s=0.33, tpot_s=0.011))

`python -m dsjax.bench` is the command line (cli.py; `engine`, `kernels`, `transfer` and `profile`
run the micro-benchmarks); docs/results.md has the results. Nothing is imported here, so the
load-generator path imports neither jax nor matplotlib: import the module you need.
"""
