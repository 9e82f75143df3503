"""Real serving workloads (ShareGPT, HumanEval, a LongBench-shaped summarization set) and traces.

Lengths are GPT-2 BPE token counts (OPT's merges). See docs/workloads.md for the preparation rules
and measured statistics; `python -m dsjax.workloads --help` writes a JSONL trace.
"""

from dsjax.lazy import lazy_exports

_EXPORTS = {
    "WORKLOAD_NAMES": "loader",
    "load_requests": "loader",
    "load_workload": "loader",
    "prepared_rows": "loader",
    "sample_rows": "loader",
    "scale_length": "loader",
    "WorkloadRequest": "request",
    "WorkloadRow": "request",
    "LengthStats": "stats",
    "length_stats": "stats",
    "BpeTokenizer": "tokenizer",
    "gpt2_tokenizer": "tokenizer",
    "TraceConfig": "trace_gen",
    "TraceEntry": "trace_gen",
    "arrival_times": "trace_gen",
    "make_trace": "trace_gen",
    "read_trace": "trace_gen",
    "write_trace": "trace_gen",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
