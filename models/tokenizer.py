"""Text <-> token ids: a Hugging Face `tokenizer.json` wrapper, or a byte tokenizer for dummy models.

Both tokenizers share one interface:

    encode(text) -> list[int]        with BOS first when the model's HF tokenizer would add it
                                     (add_special_tokens=False: never, e.g. for a rendered chat)
    decode(ids) -> str               special tokens skipped
    incremental_decoder(prefix_ids)  an incremental decoder for streaming (`step(ids)`, `flush()`)
    apply_chat_template(messages, add_generation_prompt=..., tokenize=...)
                                     the checkpoint's Jinja2 chat template (models/chat_template.py)
    bos_token_id, eos_token_id, eos_token_ids, vocab_size, chat_template

Byte tokenizer layout (ids the model may emit beyond it decode to nothing):

    0..255  the UTF-8 bytes      256 BOS      257 EOS      258 PAD      (vocab_size 259)
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Protocol, Sequence

from models.chat_template import SPECIAL_TOKEN_NAMES, find_chat_template, render_chat_template
from models.config import ModelConfig
from models.hf_config import eos_token_ids_from_hf

BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258
BYTE_VOCAB_SIZE = 259
_REPLACEMENT = "\ufffd"
# Tokens of context kept before the first new token, so a decoder that strips a leading space
# (SentencePiece's "▁") or merges across tokens sees the same neighbourhood as a full decode.
_CONTEXT_TOKENS = 6


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    chat_template: str | None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def incremental_decoder(self, prefix_ids: Sequence[int] = ()) -> IncrementalDecoder | ByteIncrementalDecoder: ...

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, tokenize: bool = False,
                            **kwargs) -> str | list[int]: ...


class IncrementalDecoder:
    """Turns a growing list of generated ids into text deltas that never split a character.

        dec = tokenizer.incremental_decoder(prompt_ids)
        for ids_so_far in stream:          # all generated ids so far, growing by >= 0 each call
            send(dec.step(ids_so_far))     # only the new, complete text
        send(dec.flush())                  # whatever was held back, with U+FFFD for broken bytes

    It decodes the window ids[prefix:] and compares with ids[prefix:read]; text is released only
    when it grew and does not end in U+FFFD (an incomplete UTF-8 sequence from a byte-level
    token). Offsets advance on release, so the window stays a few tokens long.
    """

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._ids = [int(t) for t in prefix_ids[-_CONTEXT_TOKENS:]] if prefix_ids else []
        self._num_context = len(self._ids)
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # ids before this are already released as text

    def step(self, token_ids: Sequence[int]) -> str:
        """New complete text given all generated ids so far (ValueError if the list shrank)."""
        seen = len(self._ids) - self._num_context
        if len(token_ids) < seen:
            raise ValueError(f"token list shrank from {seen} to {len(token_ids)} ids between steps")
        self._ids.extend(int(t) for t in token_ids[seen:])
        if len(self._ids) == self._read:
            return ""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Release the held-back tail (incomplete sequences become U+FFFD); call once at the end."""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]


def _byte_string(ids: Sequence[int]) -> bytes:
    """The byte tokenizer's ids 0..255 as bytes; every other id (BOS, EOS, PAD, beyond) is dropped."""
    return bytes(t for t in map(int, ids) if 0 <= t < 256)


class ByteIncrementalDecoder:
    """`IncrementalDecoder`'s interface for the byte tokenizer, at O(new ids) a step.

    Bytes need no context (no merges, no stripped leading space), so the generated ids are decoded
    on their own through Python's incremental UTF-8 decoder: it holds back an incomplete sequence,
    replaces an invalid byte with U+FFFD as soon as it is seen, and its deltas join to exactly
    `ByteTokenizer.decode(ids)`. Ids >= 256 (BOS, EOS, PAD, and whatever an emulated or dummy
    model emits beyond the bytes) decode to nothing and cost nothing later: the window-based
    `IncrementalDecoder` re-decoded them on every step, since its window only moves on new text.
    """

    def __init__(self):
        self._codec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._seen = 0

    def step(self, token_ids: Sequence[int]) -> str:
        """New complete text given all generated ids so far (ValueError if the list shrank)."""
        if len(token_ids) < self._seen:
            raise ValueError(f"token list shrank from {self._seen} to {len(token_ids)} ids between steps")
        new = token_ids[self._seen :]
        self._seen = len(token_ids)
        return self._codec.decode(_byte_string(new))

    def flush(self) -> str:
        """Release the held-back tail (an incomplete sequence becomes U+FFFD); call once at the end."""
        return self._codec.decode(b"", final=True)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS/EOS/PAD (for dummy-weight models without tokenizer files)."""

    bos_token_id = BYTE_BOS
    eos_token_id = BYTE_EOS
    eos_token_ids = (BYTE_EOS,)
    pad_token_id = BYTE_PAD
    vocab_size = BYTE_VOCAB_SIZE
    chat_template = None

    def __init__(self, model_vocab_size: int):
        if model_vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(
                f"the byte tokenizer needs vocab_size >= {BYTE_VOCAB_SIZE} (256 bytes + BOS, EOS, PAD), "
                f"the model has vocab_size={model_vocab_size}"
            )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [BYTE_BOS] * add_special_tokens + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return _byte_string(ids).decode("utf-8", errors="replace")

    def incremental_decoder(self, prefix_ids: Sequence[int] = ()) -> ByteIncrementalDecoder:
        """The prompt's ids do not change how generated bytes decode, so they are not needed."""
        return ByteIncrementalDecoder()

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, tokenize: bool = False, **kwargs):
        raise ValueError("the byte tokenizer has no chat template (the model directory ships no tokenizer files)")


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """A `tokenizers.Tokenizer` from `tokenizer.json` (or GPT-2 style `vocab.json` + `merges.txt`,
    as the OPT repositories ship), with BOS handled explicitly.

    The text is encoded without the file's post-processor and BOS is prepended when
    `add_bos_token` (tokenizer_config.json; default True, as OPT's and LLaMA's tokenizers do),
    EOS appended when `add_eos_token` (default False). That matches HF for both families whether
    or not the file's post-processor template adds BOS itself.
    """

    def __init__(self, model_dir: Path, config: ModelConfig):
        # Special tokens may sit in special_tokens_map.json; tokenizer_config.json wins.
        tok_config = {**_read_json(model_dir / "special_tokens_map.json"), **_read_json(model_dir / "tokenizer_config.json")}
        self._tok = _load_rust_tokenizer(model_dir, tok_config)
        self.add_bos = bool(tok_config.get("add_bos_token", True))
        self.add_eos = bool(tok_config.get("add_eos_token", False))
        self.bos_token_id = self._special_id(tok_config.get("bos_token"), config.bos_token_id)
        self.eos_token_id = config.eos_token_id if config.eos_token_id is not None else self._special_id(tok_config.get("eos_token"), None)
        model_eos = eos_token_ids_from_hf(_read_json(model_dir / "config.json")) + eos_token_ids_from_hf(
            _read_json(model_dir / "generation_config.json")
        )
        ids = [self.eos_token_id, *config.all_eos_token_ids, *model_eos]
        self.eos_token_ids = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if self.add_bos and self.bos_token_id is None:
            raise ValueError(f"{model_dir}: add_bos_token is set but no BOS token id is known")
        self.chat_template = find_chat_template(model_dir, tok_config)
        # The special tokens a chat template sees by name ("bos_token": "<|begin_of_text|>", ...).
        self.special_tokens = {k: c for k in SPECIAL_TOKEN_NAMES if (c := _token_content(tok_config.get(k)))}
        self._model_dir = model_dir

    def _special_id(self, token, fallback: int | None) -> int | None:
        content = _token_content(token)
        found = self._tok.token_to_id(content) if content else None
        return found if found is not None else fallback

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(t) for t in ids], skip_special_tokens=True)

    def incremental_decoder(self, prefix_ids: Sequence[int] = ()) -> IncrementalDecoder:
        return IncrementalDecoder(self, prefix_ids)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, tokenize: bool = False, **kwargs):
        """The chat rendered with the checkpoint's template, as HF's `apply_chat_template`: text, or
        with `tokenize=True` its ids (encoded without adding BOS: templates write it themselves)."""
        if self.chat_template is None:
            raise ValueError(f"{self._model_dir} has no chat template "
                             "(tokenizer_config.json chat_template or chat_template.jinja)")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _load_rust_tokenizer(model_dir: Path, tok_config: dict):
    """tokenizer.json, else a byte-level BPE from vocab.json + merges.txt (the GPT-2/OPT slow-tokenizer
    files) with the special tokens named in `tok_config` registered."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if (model_dir / "tokenizer.json").is_file():
        return RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok = RustTokenizer(models.BPE.from_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_config.get("add_prefix_space", False)))
    tok.decoder = decoders.ByteLevel()
    specials = [_token_content(tok_config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    tok.add_special_tokens(sorted({t for t in specials if t}))
    return tok


def _has_hf_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.json").is_file() or (
        (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file()
    )


def load_tokenizer(model_dir: str | Path | None, config: ModelConfig) -> Tokenizer:
    """The HF tokenizer when `model_dir` has tokenizer.json (or vocab.json + merges.txt), else the
    byte tokenizer."""
    if model_dir is not None and _has_hf_tokenizer(Path(model_dir)):
        return HFTokenizer(Path(model_dir), config)
    return ByteTokenizer(config.vocab_size)
