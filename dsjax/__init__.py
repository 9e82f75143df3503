"""dsjax: disaggregated prefill/decode LLM serving on JAX."""

from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.engine.sampling_params import SamplingParams

__all__ = ["LLM", "Placement", "PhaseParallel", "SamplingParams"]


def __getattr__(name):  # LLM pulls in jax; keep `import dsjax` light for the planner's users
    if name == "LLM":
        from dsjax.llm import LLM

        return LLM
    raise AttributeError(name)
