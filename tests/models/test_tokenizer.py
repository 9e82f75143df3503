"""models.tokenizer: the byte tokenizer, the tokenizer.json wrapper, and incremental decoding."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.config import PRESETS
from models.tokenizer import BYTE_BOS, BYTE_EOS, BYTE_PAD, ByteTokenizer, HFTokenizer, load_tokenizer

TEXT = "héllo wörld, 日本語 costs 5€ 😀!"
CORPUS = [TEXT, "hello world", "the quick brown fox jumps over the lazy dog", "日本 € 😀 ö é"]
LLAMA = PRESETS["tiny-llama"]


def _save(tok: Tokenizer, path, tokenizer_config: dict | None, model_config: dict | None = None):
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if model_config is not None:
        (path / "config.json").write_text(json.dumps(model_config))
    return path


def byte_level_bpe() -> Tokenizer:
    """GPT-2/OPT style: byte-level BPE, so multi-byte characters can split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def metaspace_bpe() -> Tokenizer:
    """SentencePiece/LLaMA style: '▁' marks spaces and the decoder strips the leading one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    return tok


def stream(tokenizer, ids, prefix_ids=()) -> list[str]:
    """Deltas from feeding `ids` one token at a time, then the flush."""
    dec = tokenizer.incremental_decoder(prefix_ids)
    return [dec.step(ids[: i + 1]) for i in range(len(ids))] + [dec.flush()]


# ----------------------------------------------------------------------------- byte tokenizer


def test_byte_encode_decode(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, LLAMA), ByteTokenizer)  # a directory without tokenizer files
    tok = load_tokenizer(None, LLAMA)
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode(TEXT)
    assert ids[0] == BYTE_BOS == tok.bos_token_id and ids[1:] == list(TEXT.encode())
    assert tok.decode(ids + [BYTE_EOS, BYTE_PAD, 300]) == TEXT
    assert (tok.eos_token_id, tok.vocab_size) == (BYTE_EOS, 259)


def test_byte_tokenizer_needs_259_ids():
    with pytest.raises(ValueError, match="vocab_size >= 259.*vocab_size=258"):
        load_tokenizer(None, dataclasses.replace(LLAMA, vocab_size=258))


def test_byte_stream_never_splits_characters():
    tok = ByteTokenizer(512)
    deltas = stream(tok, tok.encode(TEXT)[1:])
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(stream(tok, tok.encode(TEXT), prefix_ids=[BYTE_BOS, 104, 105])) == TEXT


def test_byte_stream_holds_back_then_flushes_incomplete_sequence():
    tok = ByteTokenizer(512)
    euro = list("€".encode())  # 3 bytes
    dec = tok.incremental_decoder()
    assert dec.step([97]) == "a"
    assert dec.step([97, euro[0]]) == ""
    assert dec.step([97, euro[0], euro[1]]) == ""
    assert dec.step([97, *euro]) == "€"
    assert dec.step([97, *euro, BYTE_EOS]) == ""
    assert dec.step([97, *euro, BYTE_EOS, euro[0]]) == ""
    assert dec.flush() == "\ufffd"


def test_invalid_byte_is_released_once_followed():
    tok = ByteTokenizer(512)
    assert "".join(stream(tok, [0xFF, 98])) == "\ufffdb"


def test_byte_stream_joins_to_the_full_decode_in_any_chunking():
    """Random bytes (valid, split and invalid UTF-8) mixed with ids >= 256, fed in random chunks:
    the deltas and the flush join to the one-shot decode."""
    tok = ByteTokenizer(512)
    rng = random.Random(0)
    pool = list(TEXT.encode()) + [0x80, 0xC3, 0xE2, 0xF0, 0xFF, BYTE_EOS, BYTE_PAD, 300, 511]
    for _ in range(200):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
        dec, deltas, n = tok.incremental_decoder(), [], 0
        while n < len(ids):
            n = min(len(ids), n + rng.randint(0, 4))
            deltas.append(dec.step(ids[:n]))
        assert "".join(deltas) + dec.flush() == tok.decode(ids)


def test_byte_stream_skips_placeholder_ids_without_holding_text():
    """An emulated model emits ids past the bytes: they decode to nothing and hold nothing back."""
    dec = ByteTokenizer(512).incremental_decoder()
    ids = [300] * 1000 + [104, 105]
    assert dec.step(ids[:1000]) == "" and dec.step(ids) == "hi" and dec.flush() == ""


def test_stream_rejects_shrinking_token_list():
    dec = ByteTokenizer(512).incremental_decoder()
    dec.step([97, 98])
    with pytest.raises(ValueError, match="shrank from 2 to 1"):
        dec.step([97])


# ----------------------------------------------------------------------------- tokenizer.json


@pytest.fixture(scope="module")
def byte_bpe():
    return byte_level_bpe()


def test_hf_tokenizer_adds_bos_from_tokenizer_config(byte_bpe, tmp_path):
    path = _save(byte_bpe, tmp_path / "tok", {"add_bos_token": True, "bos_token": "</s>", "eos_token": {"content": "</s>"}})
    tok = load_tokenizer(path, dataclasses.replace(LLAMA, bos_token_id=None, eos_token_id=None))
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(TEXT)
    assert ids[0] == byte_bpe.token_to_id("</s>") == tok.bos_token_id == tok.eos_token_id
    assert ids[1:] == byte_bpe.encode(TEXT, add_special_tokens=False).ids
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == byte_bpe.get_vocab_size()


def test_hf_tokenizer_respects_add_bos_false(byte_bpe, tmp_path):
    tok = load_tokenizer(_save(byte_bpe, tmp_path / "tok", {"add_bos_token": False}), LLAMA)
    assert tok.encode(TEXT) == byte_bpe.encode(TEXT, add_special_tokens=False).ids


def test_hf_tokenizer_defaults_to_model_bos_and_eos_list(byte_bpe, tmp_path):
    path = _save(byte_bpe, tmp_path / "tok", None, {"eos_token_id": [1, 5]})
    tok = load_tokenizer(path, dataclasses.replace(LLAMA, bos_token_id=0, eos_token_id=1))
    assert tok.encode("hello")[0] == 0
    assert tok.eos_token_id == 1 and tok.eos_token_ids == (1, 5)


def test_gpt2_style_vocab_and_merges_files(byte_bpe, tmp_path):
    """OPT repositories ship vocab.json + merges.txt instead of tokenizer.json."""
    files = tmp_path / "opt"
    files.mkdir()
    byte_bpe.model.save(str(files))
    (files / "tokenizer_config.json").write_text(json.dumps({"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    reference = load_tokenizer(_save(byte_bpe, tmp_path / "json", {"bos_token": "</s>"}), LLAMA)
    tok = load_tokenizer(files, LLAMA)
    assert isinstance(tok, HFTokenizer)
    text = TEXT + " naïve 🚀"
    assert tok.encode(text) == reference.encode(text)
    assert tok.encode("a</s>b")[2] == byte_bpe.token_to_id("</s>")  # special tokens stay whole
    assert tok.decode(tok.encode(text)) == text


def test_hf_stream_matches_full_decode(byte_bpe, tmp_path):
    tok = load_tokenizer(_save(byte_bpe, tmp_path / "tok", {"bos_token": "<s>"}), LLAMA)
    text = TEXT + " naïve 🚀 ñ 語"  # characters the BPE never merged: split into byte tokens
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids)))
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_hf_stream_keeps_leading_space_with_prompt_context(tmp_path):
    tok = load_tokenizer(_save(metaspace_bpe(), tmp_path / "tok", {}), dataclasses.replace(LLAMA, bos_token_id=1))
    prompt, completion = tok.encode("hello world"), tok.encode(" the quick brown fox")[1:]
    assert tok.decode(completion) == "the quick brown fox"  # alone, the leading space is stripped
    assert "".join(stream(tok, completion, prefix_ids=prompt)) == " the quick brown fox"
    assert "".join(stream(tok, completion)) == "the quick brown fox"
