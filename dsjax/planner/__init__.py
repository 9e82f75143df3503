"""Placement planner: latency model, cluster simulator, Algorithms 1 and 2, profile fitting.

Plain Python + numpy, no jax: it imports only the engine's plain policies and records
(`dsjax.engine.policies`, `shapes`, `placement`) and workload traces. The engine profiler that
measures a profile on real devices is a benchmark (dsjax/bench/profiler.py). Entry point:
`python -m dsjax.plan` (see docs/planner.md).
"""

from dsjax.lazy import lazy_exports

_EXPORTS = {
    "ClusterSpec": "algorithms",
    "PhaseCandidate": "algorithms",
    "Plan": "algorithms",
    "algorithm1": "algorithms",
    "algorithm2": "algorithms",
    "best_colocated": "algorithms",
    "ShapeBuckets": "buckets",
    "DistServeSimulator": "distserve_sim",
    "SemanticsSearchContext": "distserve_sim",
    "search_pairs": "distserve_sim",
    "fit_profile": "fitting",
    "relative_errors": "fitting",
    "LatencyCoeffs": "latency",
    "LatencyModel": "latency",
    "Profile": "latency",
    "load_profile": "latency",
    "profile_from_json": "latency",
    "save_profile": "latency",
    "DeviceSpec": "model_spec",
    "MODELS": "model_spec",
    "MemoryModel": "model_spec",
    "ModelSpec": "model_spec",
    "canonical_model_name": "model_spec",
    "get_device": "model_spec",
    "get_model": "model_spec",
    "read_max_num_tokens": "model_spec",
    "GoodputConfig": "search",
    "SearchContext": "search",
    "find_goodput": "search",
    "SimConfig": "simulator",
    "Simulator": "simulator",
    "simulate": "simulator",
    "SLO": "slo",
    "SimResult": "slo",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
