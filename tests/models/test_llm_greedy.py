"""Greedy 32-token generation through the offline engine matches transformers' `generate`.

Prompt lengths straddle the 16-token KV block boundaries (15, 16, 17, 33) so paged writes,
block-table growth during decode and ragged prefill packing all show up in the comparison. HF runs
each prompt alone (no padding); dsjax runs them as one batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsjax import LLM, SamplingParams
from tests.support.hf_fixtures import load_hf_model, make_hf_checkpoint

PROMPT_LENGTHS = (5, 15, 16, 17, 33)
MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["opt", "llama"])
def checkpoint(request, tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp(f"greedy-{request.param}"), request.param, seed=7)
    return path, load_hf_model(path)


def hf_greedy(model, prompt: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None  # as ignore_eos: always MAX_NEW_TOKENS tokens
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(checkpoint):
    path, hf_model = checkpoint
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, hf_model.config.vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]
    llm = LLM(model=path, dtype="float32")
    outputs = llm.generate(
        prompt_token_ids=prompts, sampling=SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    )
    assert len(outputs) == len(prompts)
    for prompt, out in zip(prompts, outputs):
        want = hf_greedy(hf_model, prompt)
        assert len(want) == MAX_NEW_TOKENS
        assert list(out.token_ids) == want, f"prompt length {len(prompt)}"
