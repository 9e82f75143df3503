"""The packaged default model (models/checkpoints/tiny-chat): what `python -m dsjax.serve` serves
with no arguments. It is small, complete, loads through the ordinary Hugging Face path, and its
greedy answers are English-like words, not the random bytes of dummy weights."""

import json
import re

import pytest

from dsjax import LLM, SamplingParams
from dsjax.serve import parse_args
from models.checkpoints import DEFAULT_MODEL, ROOT, packaged_checkpoint, resolve_model

CHECKPOINT = ROOT / DEFAULT_MODEL
# A word: letters (an apostrophe or hyphen inside), optionally wrapped in quotes or brackets and
# followed by punctuation, as English prose tokenizes on whitespace.
WORD = re.compile(r"^[\"'(]?[A-Za-z]+(?:['-][A-Za-z]+)*[.,;:!?\"')]*$")


def ascii_word_share(text: str) -> tuple[float, int]:
    pieces = text.split()
    return (sum(bool(WORD.match(p)) for p in pieces) / max(len(pieces), 1)), len(pieces)


def test_checkpoint_is_complete_and_under_20_mb():
    files = {p.name: p.stat().st_size for p in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files.keys()
    assert sum(files.values()) <= 20 * 2**20, files
    assert json.loads((CHECKPOINT / "tokenizer_config.json").read_text())["chat_template"]
    report = json.loads((CHECKPOINT / "training.json").read_text())
    assert report["held_out_loss"] < 5.0  # nats/token; an untrained 4096-token model is at ln(4096) = 8.3


def test_it_is_the_default_of_the_server_and_resolves_by_name():
    assert parse_args([]).model == str(CHECKPOINT)
    assert resolve_model("tiny-chat") == str(CHECKPOINT) and packaged_checkpoint("tiny-chat") == CHECKPOINT
    assert resolve_model("tiny-llama") == "tiny-llama" and packaged_checkpoint("../etc") is None


def test_word_share_tells_words_from_noise():
    assert ascii_word_share("Once upon a time, there was a \"little\" dog's house.")[0] == 1.0
    assert ascii_word_share("\x07\x1b Ġ 7Ĳ ,,, ]]}{ ü")[0] == 0.0


@pytest.fixture(scope="module")
def llm():
    return LLM(model=DEFAULT_MODEL, num_blocks=64)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_greedy_output_is_mostly_ascii_words(llm, chat):
    if chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is a good way to learn to cook?"}],
                                                   add_generation_prompt=True, tokenize=True)
    else:
        prompt = llm.tokenizer.encode("Once upon a time")
    out = llm.generate(prompt_token_ids=[prompt], sampling=SamplingParams(max_tokens=48, temperature=0.0))[0]
    text = llm.tokenizer.decode(out.token_ids)
    share, words = ascii_word_share(text)
    assert words >= 8 and share >= 0.8, text
