"""The offline API: validation at the boundary, text prompts, placements and modes."""

import pytest

from dsjax import LLM, Placement, SamplingParams
from dsjax.engine.placement import PhaseParallel


@pytest.fixture(scope="module")
def llm():
    return LLM(model="tiny-llama", dummy_weights=True, dtype="float32")


GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(
    "prompt, sampling, field",
    [
        ([], GREEDY, "prompt"),
        ([1] * 512, GREEDY, "context length"),
        ([1] * 500, SamplingParams(max_tokens=20), "max_tokens"),
        ([1, 99999], GREEDY, "vocabulary"),
        ([1, -1], GREEDY, "vocabulary"),
    ],
)
def test_bad_prompts_raise_naming_the_field(llm, prompt, sampling, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(prompt_token_ids=[prompt], sampling=sampling)
    assert not llm.engine.has_unfinished()  # nothing half-admitted


def test_text_and_token_prompts_agree(llm):
    text_out = llm.generate("hello world", sampling=GREEDY)[0]
    ids = llm.tokenizer.encode("hello world")
    tok_out = llm.generate(prompt_token_ids=[ids], sampling=GREEDY)[0]
    assert text_out.token_ids == tok_out.token_ids and len(tok_out.token_ids) == 6
    assert text_out.text == llm.tokenizer.decode(tok_out.token_ids)
    assert text_out.finish_reason.value == "length"


def test_seeded_sampling_is_reproducible_and_max_tokens_respected(llm):
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
    a = llm.generate(prompt_token_ids=[[5, 6, 7]] * 2, sampling=sp)
    b = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling=sp)
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids
    assert len(b[0].token_ids) == 8


def test_disaggregated_placement_matches_colocated(llm):
    prompts = [[3, 1, 4, 1, 5], list(range(10, 30))]
    want = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling=GREEDY)]
    disagg = LLM(model="tiny-llama", dummy_weights=True, placement=Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel()), mode="disaggregated")
    assert [o.token_ids for o in disagg.generate(prompt_token_ids=prompts, sampling=GREEDY)] == want


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dtype"):
        LLM(model="tiny-llama", dummy_weights=True, dtype="int8")
    with pytest.raises(ValueError, match="preset"):
        LLM(model="no-such-model", dummy_weights=True)
    with pytest.raises(ValueError, match="placement"):
        LLM(model="tiny-llama", dummy_weights=True, mode="disaggregated")
