"""Generation stops on every EOS id a checkpoint lists (Llama-3-Instruct's generation_config.json
names several), offline and through the in-process server; `ignore_eos` overrides all of them."""

import json
from pathlib import Path

import pytest

import dsjax
from dsjax.engine.request import FinishReason, Request
from dsjax.engine.sampling_params import SamplingParams
from tests.support.hf_fixtures import make_hf_checkpoint


def test_request_stops_on_any_listed_eos_id():
    req = Request(request_id="r", prompt_token_ids=[1], sampling=SamplingParams(max_tokens=10), seed=0,
                  eos_token_ids=(5, 9))
    assert not req.append_token(3, 0.0) and req.append_token(9, 0.0)
    assert req.finish_reason is FinishReason.EOS and req.output_token_ids == [3, 9]
    keep = Request(request_id="k", prompt_token_ids=[1], sampling=SamplingParams(max_tokens=10, ignore_eos=True), seed=0,
                   eos_token_ids=(5, 9))
    assert not keep.append_token(9, 0.0) and not keep.append_token(5, 0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return Path(make_hf_checkpoint(tmp_path_factory.mktemp("eos"), "llama"))


def test_llm_stops_on_the_second_eos_id_of_generation_config(checkpoint):
    prompt = [[3, 14, 15, 92, 65, 35]]
    free = dsjax.LLM(model=str(checkpoint), dtype="float32", num_blocks=64)
    tokens = free.generate(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=8, temperature=0.0,
                                                                            ignore_eos=True))[0].token_ids
    first_eos = free.config.eos_token_id
    # the third greedy token becomes a second EOS id (unless an earlier token already is one)
    stop_at = next(i for i, t in enumerate(tokens) if i >= 2 and t != first_eos and t not in tokens[:i])
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [first_eos, tokens[stop_at]]}))
    llm = dsjax.LLM(model=str(checkpoint), dtype="float32", num_blocks=64)
    assert llm.config.all_eos_token_ids == (first_eos, tokens[stop_at])
    out = llm.generate(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.token_ids == tokens[: stop_at + 1] and out.finish_reason is FinishReason.EOS
