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
