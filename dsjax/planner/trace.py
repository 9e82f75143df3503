"""Workload traces for the planner: a re-export of `dsjax.workloads.trace_gen`, the project's one
trace implementation (JSON Lines format, arrival processes, length samplers, `rescale_rate`)."""

from dsjax.workloads.trace_gen import (
    ARRIVAL_PROCESSES,
    ARRIVALS,
    SHAREGPT_LIKE,
    FixedLengths,
    LengthSampler,
    LognormalLengths,
    PairLengths,
    Trace,
    TraceConfig,
    TraceEntry,
    UniformLengths,
    arrival_times,
    gamma_arrivals,
    generate_trace,
    length_sampler_from_spec,
    make_trace,
    poisson_arrivals,
    read_trace,
    rescale_rate,
    resample,
    write_trace,
)

__all__ = [
    "ARRIVALS", "ARRIVAL_PROCESSES", "SHAREGPT_LIKE", "FixedLengths", "LengthSampler", "LognormalLengths",
    "PairLengths", "Trace", "TraceConfig", "TraceEntry", "UniformLengths", "arrival_times", "gamma_arrivals",
    "generate_trace", "length_sampler_from_spec", "make_trace", "poisson_arrivals", "read_trace", "rescale_rate",
    "resample", "write_trace",
]
