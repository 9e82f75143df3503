"""The training corpus: which ShareGPT text counts as English prose, and row packing's invariants."""

import numpy as np
import pytest

from dsjax.training.corpus import (CHAT_TEMPLATE, SPECIAL_TOKENS, CorpusConfig, documents, is_english_prose,
                                   pack_rows, train_tokenizer)
from dsjax.workloads.sharegpt import Conversation
from models.chat_template import render_chat_template

PROSE = "The quick brown fox jumps over the lazy dog, and then it runs back home again."


def test_english_prose_filter():
    assert is_english_prose(PROSE)
    assert not is_english_prose("short")
    assert not is_english_prose(PROSE + "\n```python\nprint(1)\n```")
    assert not is_english_prose("这是一个中文句子，它不是英文。" * 5)
    assert not is_english_prose("{x: 1, y: [2, 3], z: {a: 4}} = (5 + 6) * 7 / 8 - 9;" * 3)


def test_documents_keep_chat_and_plain_and_stop_at_the_first_bad_turn():
    conv = Conversation(index=0, id="a", roles=("human", "gpt", "human", "gpt"),
                        texts=(PROSE, PROSE + " Yes.", "```code```" + PROSE, PROSE))
    docs = list(documents([conv], CorpusConfig()))
    assert docs[0] == ("chat", [{"role": "user", "content": PROSE}, {"role": "assistant", "content": PROSE + " Yes."}])
    assert [d for k, d in docs if k == "plain"] == [PROSE, PROSE + " Yes."]
    gpt_first = Conversation(index=1, id="b", roles=("gpt", "human"), texts=(PROSE, PROSE))
    assert [k for k, _ in documents([gpt_first], CorpusConfig())] == ["plain", "plain"]
    with pytest.raises(ValueError, match="max_turns"):
        CorpusConfig(max_turns=0)


def test_chat_template_renders_the_training_format():
    text = render_chat_template(CHAT_TEMPLATE, [{"role": "user", "content": " Hi there "}], add_generation_prompt=True,
                                bos_token="<|bos|>", eos_token="<|end|>")
    assert text == "<|bos|><|user|>\nHi there<|end|>\n<|assistant|>\n"


def test_pack_rows_segments_positions_and_cuts():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]  # the last is too short to train anything
    rows = pack_rows(docs, seq_len=5, pad_id=0)
    assert rows.tokens.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11]]
    assert rows.segments.tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]]
    assert rows.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert len(pack_rows(docs * 10, seq_len=5, pad_id=0, max_rows=3)) == 3


def test_tokenizer_is_byte_level_with_specials_first():
    tok = train_tokenizer([PROSE] * 50 + ["Hello world, hello again."] * 20, vocab_size=300)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for text in (PROSE, "naïve café ✓ 你好"):  # unseen characters still encode (byte fallback)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert np.all(np.asarray(tok.encode("<|bos|>hi<|end|>").ids[:1]) == 0)
