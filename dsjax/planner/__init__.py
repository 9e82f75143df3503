"""Placement planner: workload traces, latency model, cluster simulator, Algorithms 1 and 2.

Plain Python + numpy; no jax, except `dsjax.planner.profiler` (the engine profiler), which this
package never imports. Entry point: `python -m dsjax.plan` (see docs/planner.md).
"""

from dsjax.planner.algorithms import ClusterSpec, PhaseCandidate, Plan, algorithm1, algorithm2, best_colocated
from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.fitting import fit_profile, relative_errors
from dsjax.planner.latency import LatencyCoeffs, LatencyModel, Profile, load_profile, profile_from_json, save_profile
from dsjax.planner.metrics import SLO, SimResult
from dsjax.planner.models import (
    MODELS,
    DeviceSpec,
    MemoryModel,
    ModelSpec,
    canonical_model_name,
    get_device,
    get_model,
    read_max_num_tokens,
)
from dsjax.planner.replan import ReplanResult, check_and_replan
from dsjax.planner.search import GoodputConfig, SearchContext, find_goodput
from dsjax.planner.simulator import SchedulerConfig, Simulator, simulate
from dsjax.planner.trace import (
    SHAREGPT_LIKE,
    FixedLengths,
    LognormalLengths,
    PairLengths,
    Trace,
    UniformLengths,
    generate_trace,
    read_trace,
    rescale_rate,
    resample,
    write_trace,
)

__all__ = [
    "SHAREGPT_LIKE", "SLO", "ClusterSpec", "DeviceSpec", "FixedLengths", "GoodputConfig", "LatencyCoeffs",
    "LatencyModel", "LognormalLengths", "MODELS", "MemoryModel", "ModelSpec", "PairLengths", "PhaseCandidate",
    "Plan", "Profile", "ReplanResult", "SchedulerConfig", "SearchContext", "ShapeBuckets", "SimResult", "Simulator", "Trace",
    "UniformLengths", "algorithm1", "algorithm2", "best_colocated", "canonical_model_name", "check_and_replan",
    "find_goodput", "fit_profile", "generate_trace", "get_device", "get_model", "load_profile",
    "profile_from_json", "read_max_num_tokens", "read_trace", "relative_errors", "rescale_rate", "resample", "save_profile",
    "simulate", "write_trace",
]
