"""The Pallas kernels behind the model's attention seam (interpret mode on CPU) generate exactly
what the jnp path generates."""

import numpy as np

import pallas_kernels
from dsjax import LLM, SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from models.attention import attend
from tests.support.mixed_batch import mixed_batch


def test_pallas_backend_generation_equals_xla(monkeypatch):
    traced = []
    for name in ("ragged_prefill_attention", "paged_decode_attention"):
        real = getattr(pallas_kernels, name)
        monkeypatch.setattr(pallas_kernels, name, lambda *a, _real=real, _name=name, **k: (traced.append(_name), _real(*a, **k))[1])
    prompts = [[7, 3, 9], list(range(40, 57)), [1] * 16]  # lengths around the 16-token block boundary
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("xla", "pallas"):
        llm = LLM(model="tiny-llama", dummy_weights=True, attention_backend=backend)
        outs[backend] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling=sp)]
        if backend == "xla":
            assert not traced
    assert set(traced) == {"ragged_prefill_attention", "paged_decode_attention"}  # the kernels really ran
    assert outs["pallas"] == outs["xla"]
    assert all(len(t) == 5 for t in outs["xla"])


def test_pallas_backend_under_tensor_parallelism():
    """With heads split over tp devices the kernels run per device inside a shard_map."""
    from dsjax import Placement
    from dsjax.engine.placement import PhaseParallel

    prompts = [[5, 9, 2, 7], list(range(100, 121))]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    placement = Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel(tp=2))
    outs = {}
    for backend in ("xla", "pallas"):
        llm = LLM(model="tiny-llama", dummy_weights=True, attention_backend=backend, placement=placement, mode="disaggregated")
        outs[backend] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling=sp)]
    assert outs["pallas"] == outs["xla"]


def test_auto_backend_mixes_paths_and_matches_xla(monkeypatch):
    """On CPU, "auto" sends large prefill shapes to the ragged kernel and the rest to jnp."""
    used = []
    real = pallas_kernels.ragged_prefill_attention
    monkeypatch.setattr(pallas_kernels, "ragged_prefill_attention", lambda *a, **k: (used.append(a[0].shape), real(*a, **k))[1])
    # packs to 1024 tokens of fresh prompts: the jnp path would score 1024 x 1024 pairs (> 512 x 512)
    prompts = [list(range(1, 301)), [t % 400 + 7 for t in range(250)], [3] * 20]
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("xla", "auto"):
        llm = LLM(model="tiny-llama", dummy_weights=True, attention_backend=backend,
                  scheduler=SchedulerConfig(max_prefill_tokens=1024))
        outs[backend] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling=sp)]
    assert used and all(shape[0] == 1024 for shape in used)  # only the big prefill took the kernel
    assert outs["auto"] == outs["xla"]


def test_pallas_backend_reads_the_split_layout_of_a_mixed_batch():
    """A chunked-prefill step's split metadata (decode region first) is a valid ragged description
    for the prefill kernel: same attention as the jnp path, which splits it."""
    q, k_cache, v_cache, meta, _ = mixed_batch(2, table_blocks=4)
    assert meta.num_decode_rows > 0
    out = {backend: np.asarray(attend(q, k_cache, v_cache, meta, sm_scale=0.3, backend=backend)) for backend in ("xla", "pallas")}
    assert np.isfinite(out["pallas"]).all()
    np.testing.assert_allclose(out["pallas"], out["xla"], atol=1e-5)
