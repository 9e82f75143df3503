"""`python -m dsjax.bench`: the serving benchmark (load generator, goodput, the headline comparison).

    python -m dsjax.bench --target localhost:50051 --workload sharegpt --rates 1,2,4 --ttft 0.3 --tpot 0.015
    python -m dsjax.bench compare --quick
    python -m dsjax.bench engine|kernels|transfer|profile [ARGS]   # the micro-benchmarks and the profiler

The code lives in dsjax/bench (cli.py parses the flags); docs/results.md has the results.
"""

import sys

from dsjax.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
