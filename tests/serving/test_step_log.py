"""The served step log (`--step-log`): the engine loop times every step with the shapes of the
program calls it made, and the records are what a served profile is fitted on."""

import json
import time

import jax.numpy as jnp
import pytest

from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.planner.served import served_samples
from dsjax.runtime.builder import build_engine
from dsjax.runtime.kv_cache import CacheConfig
from models.transformer import CausalLM
from models.weights import load_model
from serving.backend import GenerateJob
from serving.engine_loop import FinishEvent, TokenEvent
from serving.inprocess import InProcessBackend
from serving.step_log import StepLog, StepTimer, read_step_log


def test_step_log_records_and_windows(tmp_path):
    log = StepLog(tmp_path / "a.jsonl")
    timer = StepTimer(log)
    timer.start()
    timer.stop()  # no program call: no record
    assert log.num_steps == 0
    timer.start()
    log.note("decode", [5, 9])
    log.note("prefill", [(0, 7), (3, 4)])
    time.sleep(0.002)
    timer.stop()
    t_mid = round(time.time(), 6)  # as the log rounds a step's start: the next step's is never below it
    timer.start()
    log.note("decode", [6, 10])
    timer.stop()
    log.close()
    recs = read_step_log(tmp_path / "a.jsonl")
    assert len(recs) == 2
    assert recs[0]["calls"] == [{"kind": "decode", "ctx": [5, 9]}, {"kind": "prefill", "chunks": [[0, 7], [3, 4]]}]
    assert recs[0]["ms"] >= 2.0
    assert [r["calls"][0]["ctx"] for r in read_step_log(tmp_path / "a.jsonl", since=t_mid)] == [[6, 10]]
    assert read_step_log(tmp_path / "a.jsonl", until=t_mid) == recs[:1]
    with pytest.raises(ValueError, match="kind"):
        log.note("mixed", [])


def test_records_name_the_attention_backend(tmp_path):
    log = StepLog(tmp_path / "k.jsonl", backend="pallas")
    timer = StepTimer(log)
    timer.start()
    log.note("prefill", [(0, 3)])
    timer.stop()
    log.close()
    assert [r["backend"] for r in read_step_log(tmp_path / "k.jsonl")] == ["pallas"]


def test_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"t": 1.0, "ms": 1.0, "calls": []}) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_step_log(p)


def test_served_engine_writes_its_steps(tmp_path):
    config, params = load_model("tiny-llama", dtype=jnp.float32, dummy_weights=True, seed=0)
    engine = build_engine(CausalLM(config=config, dtype=jnp.float32), params, placement=None, mode="colocated",
                          cache=CacheConfig(num_blocks=64, block_size=16), scheduler=SchedulerConfig(max_num_seqs=8))
    backend = InProcessBackend(engine)
    backend.start()
    log = StepLog(tmp_path / "engine.jsonl")
    backend.attach_step_log(log, [engine.runner])
    prompts = {"a": [256, 5, 6, 7, 8], "b": [256] + list(range(30, 50))}
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    handles = [backend.submit(GenerateJob(request_id=k, prompt_token_ids=v, sampling=sp, seed=0, eos_token_ids=()))
               for k, v in prompts.items()]
    for h in handles:
        events = list(h.events())
        assert sum(len(e.token_ids) for e in events if isinstance(e, TokenEvent)) == 6
        assert isinstance(events[-1], FinishEvent)
    backend.close()
    log.close()
    recs = read_step_log(tmp_path / "engine.jsonl")
    samples = served_samples(recs)
    # every prompt is prefilled whole once (maybe both in one batch), and 5 more tokens are decoded
    assert sorted(n for lens, _ in samples.prefill for n in lens) == sorted(len(p) for p in prompts.values())
    contexts = sorted(c for ctx, _ in samples.decode for c in ctx)
    expected = sorted(len(p) + i for p in prompts.values() for i in range(5))  # context before each decode
    assert contexts == expected
    assert all(r["ms"] > 0 for r in recs) and samples.multi == samples.mixed == 0
