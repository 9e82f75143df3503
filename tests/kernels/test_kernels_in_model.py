"""The Pallas kernels behind the model's attention seam (interpret mode on CPU) generate exactly
what the jnp path generates."""

import pallas_kernels
from dsjax import LLM, SamplingParams


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
    from dsjax.placement import PhaseParallel

    prompts = [[5, 9, 2, 7], list(range(100, 121))]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    placement = Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel(tp=2))
    outs = {}
    for backend in ("xla", "pallas"):
        llm = LLM(model="tiny-llama", dummy_weights=True, attention_backend=backend, placement=placement, mode="disaggregated")
        outs[backend] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling=sp)]
    assert outs["pallas"] == outs["xla"]
