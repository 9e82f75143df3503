import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.engine.sampling_params import SamplingParams
from dsjax.runtime.sampling import SamplingArrays, sample


def arrays(b, temperature=1.0, top_k=0, top_p=1.0, seed=0, step=0):
    return SamplingArrays(
        temperature=jnp.full(b, temperature, jnp.float32), top_k=jnp.full(b, top_k, jnp.int32),
        top_p=jnp.full(b, top_p, jnp.float32), seed=jnp.full(b, seed, jnp.uint32), step=jnp.arange(b, dtype=jnp.int32) + step,
    )


LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))


_sample = jax.jit(sample)


def draw(n=4000, **kw):
    logits = jnp.repeat(LOGITS, n, axis=0)
    return np.asarray(_sample(logits, arrays(n, **kw)))


def test_greedy_is_argmax():
    assert set(draw(temperature=0.0)) == {0}


def test_top_k_and_top_p_restrict_support():
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.6)) == {0, 1}  # 0.5 alone is below 0.6, so the second token is kept
    assert set(draw(top_p=0.5)) == {0}
    assert set(draw(top_k=1)) == {0}
    assert set(draw()) == {0, 1, 2, 3}


def test_frequencies_follow_temperature():
    counts = np.bincount(draw(), minlength=4) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    hot = np.bincount(draw(temperature=100.0), minlength=4) / 4000
    assert np.allclose(hot, 0.25, atol=0.04)


def test_seed_and_step_make_draws_reproducible():
    a, b, c = draw(seed=7), draw(seed=7), draw(seed=8)
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"seed": -1}, "seed")],
)
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
