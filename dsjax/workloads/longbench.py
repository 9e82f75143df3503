"""A long-document summarization workload in LongBench's shape, built from real ShareGPT text.

No LongBench package exists on PyPI, so the documents and answers come from the longest real
summarization exchanges in the ShareGPT wheel: a user turn that asks for a summary (`SUMMARY_REQUEST`
matches it: "summar...", "tl;dr", "key points/takeaways", "main points/ideas", "gist") followed by
an assistant turn. The document is the whole conversation up to and including that request
(turns joined with "\n"); the answer is the assistant's reply, a real summary.

Lengths follow DistServe's LongBench rule: for each pair draw L ~ U{1900..2048} (seeded per pair)
and cap it, L = min(2040 - answer_len, L); the prompt is the document cut to L tokens. Documents
shorter than L tokens, and answers of 2040 tokens or more, are dropped. Unlike DistServe (which
keeps the *first* tokens of LongBench's `context` field, the question being separate), we keep the
*last* L tokens, so the summary request at the end of the document stays in the prompt.
"""

from __future__ import annotations

import random
import re

from tqdm import tqdm

from dsjax.workloads import sharegpt
from dsjax.workloads.request import WorkloadRow
from dsjax.workloads.tokenizer import BpeTokenizer

PACKAGES = sharegpt.PACKAGES
MIN_PROMPT_LEN = 1900
MAX_PROMPT_LEN = 2048
LENGTH_CAP = 2040
SUMMARY_REQUEST = re.compile(r"summar|tl;\s?dr|key (?:points|takeaways)|main (?:points|ideas)|\bgist\b", re.IGNORECASE)


def summary_turns(conversation: sharegpt.Conversation) -> list[int]:
    """Assistant turns k whose preceding user turn asks for a summary."""
    roles, texts = conversation.roles, conversation.texts
    return [
        k
        for k in range(1, len(roles))
        if roles[k] in sharegpt.ASSISTANT_ROLES
        and roles[k - 1] in sharegpt.USER_ROLES
        and SUMMARY_REQUEST.search(texts[k - 1])
    ]


def document(conversation: sharegpt.Conversation, output_turn: int) -> str:
    return conversation.prompt_and_output(output_turn)[0]


def drawn_prompt_len(*, seed: int, conversation_index: int, output_turn: int, answer_len: int) -> int:
    """DistServe's capped draw: min(2040 - answer_len, U{1900..2048}); <= 0 means no room."""
    draw = random.Random(f"longbench:{seed}:{conversation_index}:{output_turn}").randint(MIN_PROMPT_LEN, MAX_PROMPT_LEN)
    return min(LENGTH_CAP - answer_len, draw)


def prepare(*, seed: int, source_limit: int | None, tokenizer: BpeTokenizer) -> list[WorkloadRow]:
    """Rows from the summary requests among the first `source_limit` conversations (all when None)."""
    conversations = tqdm(
        sharegpt.iter_conversations(source_limit), desc="preparing longbench", unit="conv", disable=None
    )
    candidates = [(conv, k) for conv in conversations for k in summary_turns(conv)]
    answer_lens = tokenizer.count_batch([conv.texts[k] for conv, k in candidates])
    sized = []
    for (conv, k), answer_len in zip(candidates, answer_lens):
        prompt_len = drawn_prompt_len(seed=seed, conversation_index=conv.index, output_turn=k, answer_len=answer_len)
        doc = document(conv, k)
        # A token is at least one byte, so a document under L bytes cannot hold L tokens.
        if answer_len >= 1 and prompt_len >= 1 and len(doc.encode("utf-8")) >= prompt_len:
            sized.append((conv, k, doc, prompt_len, answer_len))
    doc_lens = tokenizer.count_batch([doc for _, _, doc, _, _ in sized])
    return [
        WorkloadRow(locator=(conv.index, k, prompt_len), prompt_len=prompt_len, output_len=answer_len)
        for (conv, k, _, prompt_len, answer_len), doc_len in zip(sized, doc_lens)
        if doc_len >= prompt_len
    ]


def materialize(rows: list[WorkloadRow], *, tokenizer: BpeTokenizer) -> list[tuple[str, list[int]]]:
    """(source id, prompt token ids): the last L tokens of each row's document."""
    conversations = sharegpt.conversations_at({row.locator[0] for row in rows})
    docs = [document(conversations[row.locator[0]], row.locator[1]) for row in rows]
    out = []
    for row, ids in zip(rows, tokenizer.encode_batch(docs)):
        index, k, kept = row.locator
        conv = conversations[index]
        if len(ids) < kept or kept != row.prompt_len:
            raise RuntimeError(f"stale LongBench-shaped row for {conv.id=}: {len(ids)=}, {kept=}, {row.prompt_len=}")
        out.append((f"longbench-sharegpt/{conv.id}/turn{k}", ids[len(ids) - kept :]))
    return out
