"""Greedy 32-token generation through the offline engine matches transformers' `generate`, for
every family, and through the engine's other paths where a family's layers depend on them.

Prompt lengths straddle the 16-token KV block boundaries (15, 16, 17, 33) so paged writes,
block-table growth during decode and ragged prefill packing all show up in the comparison. HF runs
each prompt alone (no padding); dsjax runs them as one batch. Mistral's 24-token window (see
tests/support/hf_fixtures.py) is crossed by every prompt's generation; in chunked mode its
33-token prompt is split so a later chunk attends a windowed cached prefix while running decodes
share the step. Qwen3 under tensor parallelism splits heads (and so its per-head q/k norms and,
for Qwen2, its q/k/v biases) over two devices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsjax import LLM, PhaseParallel, Placement, SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from tests.support.hf_fixtures import load_hf_model, make_hf_checkpoint

PROMPT_LENGTHS = (5, 15, 16, 17, 33)
MAX_NEW_TOKENS = 32
TP2 = Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel(tp=2))

# id -> (family, LLM keyword arguments beyond the checkpoint)
CASES = {
    "opt": ("opt", {}),
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "mistral-chunked": ("mistral", {"mode": "chunked", "scheduler": SchedulerConfig(max_num_seqs=4, max_prefill_tokens=24)}),
    "qwen2-disaggregated-tp2": ("qwen2", {"mode": "disaggregated", "placement": TP2}),
    "qwen3-disaggregated-tp2": ("qwen3", {"mode": "disaggregated", "placement": TP2}),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """family -> (checkpoint path, prompts, HF greedy tokens per prompt), built on first use."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = make_hf_checkpoint(tmp_path_factory.mktemp(f"greedy-{family}"), family, seed=7)
            model = load_hf_model(path)
            rng = np.random.default_rng(0)
            prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]
            cache[family] = (path, prompts, [hf_greedy(model, p) for p in prompts])
        return cache[family]

    return get


def hf_greedy(model, prompt: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None  # as ignore_eos: always MAX_NEW_TOKENS tokens
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case, references):
    family, llm_kwargs = CASES[case]
    path, prompts, want = references(family)
    llm = LLM(model=path, dtype="float32", **llm_kwargs)
    outputs = llm.generate(
        prompt_token_ids=prompts, sampling=SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    )
    assert len(outputs) == len(prompts)
    for prompt, out, expected in zip(prompts, outputs, want):
        assert len(expected) == MAX_NEW_TOKENS
        assert list(out.token_ids) == expected, f"{case}, prompt length {len(prompt)}"
