"""Real serving workloads (ShareGPT, HumanEval, a LongBench-shaped summarization set) and traces.

Lengths are GPT-2 BPE token counts (OPT's merges). See docs/workloads.md for the preparation rules
and measured statistics; `python -m dsjax.workloads --help` writes a JSONL trace.
"""

from dsjax.workloads.loader import (
    WORKLOAD_NAMES,
    load_requests,
    load_workload,
    prepared_rows,
    sample_rows,
    scale_length,
)
from dsjax.workloads.request import WorkloadRequest, WorkloadRow
from dsjax.workloads.stats import LengthStats, length_stats
from dsjax.workloads.tokenizer import BpeTokenizer, gpt2_tokenizer
from dsjax.workloads.trace_gen import (
    TraceConfig,
    TraceEntry,
    arrival_times,
    make_trace,
    read_trace,
    write_trace,
)

__all__ = [
    "WORKLOAD_NAMES",
    "BpeTokenizer",
    "LengthStats",
    "TraceConfig",
    "TraceEntry",
    "WorkloadRequest",
    "WorkloadRow",
    "arrival_times",
    "gpt2_tokenizer",
    "length_stats",
    "load_requests",
    "load_workload",
    "make_trace",
    "prepared_rows",
    "read_trace",
    "sample_rows",
    "scale_length",
    "write_trace",
]
