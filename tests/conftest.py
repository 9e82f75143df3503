"""Shared test set-up: 8 fake CPU devices (for sharding and transfer tests) and tiny models."""

import os

# Must happen before jax is imported anywhere in the test session: 8 fake CPU devices, and cheap
# LLVM passes (tiny test models spend far longer compiling than running).
_FLAGS = "--xla_force_host_platform_device_count=8 --xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()
# The cluster's shared secret (serving/cluster_auth.py): servers the tests launch inherit it, and
# the helpers that call internal services (tests/support/serving.py) present it.
os.environ.setdefault("DSJAX_CLUSTER_TOKEN", "tests-" + os.urandom(8).hex())

import jax  # noqa: E402
import pytest  # noqa: E402

# Reuse compiled programs across test runs on the same machine (a no-op on a fresh one).
jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/dsjax/jax-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def tiny_llama():
    """(CausalLM, params) for the tiny LLaMA preset (GQA 4:2, head_dim 16), float32."""
    import jax

    from models import CausalLM, get_preset

    model = CausalLM(config=get_preset("tiny-llama"))
    return model, model.init(jax.random.PRNGKey(1))


@pytest.fixture(scope="session")
def tiny_opt():
    import jax

    from models import CausalLM, get_preset

    model = CausalLM(config=get_preset("tiny-opt"))
    return model, model.init(jax.random.PRNGKey(2))
