"""`--emulate`'s glue (dsjax/emulate.py): flags -> per-instance latency models, KV pools and
engines on emulated devices."""

import json

import pytest

from dsjax.emulate import Emulation
from dsjax.engine.disaggregated import DisaggEngine
from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.engine.request import Request
from dsjax.engine.sampling_params import SamplingParams
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.planner.latency import load_profile
from dsjax.runtime.emulated import emulated_num_blocks
from dsjax.serve import parse_args
from models.config import PRESETS
from tests.support.planner_reference import distserve_profile

COEFFS = {"prefill": [18.1, 0.1019, 7.12e-6], "decoding_smallbs": [19.93, 6.27e-4, 0.0385],
          "decoding_largebs": [7.17, 5.8e-4, 0.158], "decoding_large_small_bs_threshold": 95}


def write_profile(path, tps=(1, 2), metadata=None):
    doc = {"facebook/opt-13b": {str(tp): COEFFS for tp in tps}}
    if metadata:
        doc["metadata"] = metadata
    path.write_text(json.dumps(doc))
    return str(path)


def emulation(argv):
    return Emulation.from_args(parse_args(argv))


def test_flags_build_an_emulation(tmp_path):
    prof = write_profile(tmp_path / "p.json")
    e = emulation(["--emulate", prof, "--model", "opt-13b", "--emulate-link-gbps", "200", "--emulate-devices", "8"])
    assert (e.dtype, e.dtype_bytes, e.num_devices, e.link_bytes_per_s) == ("float16", 2, 8, 25e9)
    assert e.latency(2, 1).tp == 2 and e.latency(2, 2).pp == 2
    assert emulation(["--emulate", prof, "--model", "opt-13b", "--dtype", "float32"]).dtype == "float32"
    meta = write_profile(tmp_path / "m.json", metadata={"dtype": "bfloat16"})
    assert emulation(["--emulate", meta, "--model", "opt-13b"]).dtype == "bfloat16"
    assert parse_args([]).dtype == "float32" and parse_args(["--emulate", prof]).dtype is None
    again = emulation(e.worker_argv() + ["--model", "opt-13b"])  # what a worker process is given
    assert (again.profile_path, again.memory_bytes, again.utilization, again.link_bytes_per_s) == \
        (e.profile_path, e.memory_bytes, e.utilization, e.link_bytes_per_s)
    with pytest.raises(ValueError, match="no model 'opt-66b'"):
        emulation(["--emulate", prof, "--model", "opt-66b"])


def test_slow_motion_stretches_steps_and_transfers_and_reaches_workers(tmp_path):
    prof = write_profile(tmp_path / "p.json")
    e = emulation(["--emulate", prof, "--model", "opt-13b", "--emulate-link-gbps", "200", "--emulate-time-scale", "2.5"])
    r = e.runner(PhaseParallel(tp=2, pp=1, replicas=1), block_size=16)
    assert r.cost.decode_step_s(4, 400.0) == pytest.approx(2.5 * e.latency(2, 1).decode_step_s(4, 400.0))
    assert r.link_bytes_per_s == pytest.approx(25e9 / 2.5) and e.link_bytes_per_s == 25e9
    assert emulation(e.worker_argv() + ["--model", "opt-13b"]).time_scale == 2.5
    assert "slow motion x2.5" in e.describe(Placement.colocated(tp=2, replicas=1), 16)
    assert emulation(["--emulate", prof, "--model", "opt-13b"]).runner(PhaseParallel(tp=1, pp=1, replicas=1),
                                                                      block_size=16).cost == e.latency(1, 1)
    with pytest.raises(ValueError, match="time-scale"):
        emulation(["--emulate", prof, "--model", "opt-13b", "--emulate-time-scale", "0"])


def test_runners_take_the_profiles_tp_and_the_devices_memory(tmp_path):
    e = emulation(["--emulate", write_profile(tmp_path / "p.json"), "--model", "opt-13b", "--emulate-memory-gib", "40"])
    r = e.runner(PhaseParallel(tp=2, pp=2), block_size=16)
    assert (r.tp, r.pp, r.cost.tp, r.cost.pp) == (2, 2, 2, 2)
    assert r.cache_config.num_blocks == emulated_num_blocks(PRESETS["opt-13b"], tp=2, pp=2, block_size=16, dtype_bytes=2,
                                                            memory_bytes=40 * 2**30)
    assert e.runner(PhaseParallel(), block_size=16, num_blocks=99).cache_config.num_blocks == 99


def test_check_says_what_does_not_fit(tmp_path):
    e = emulation(["--emulate", write_profile(tmp_path / "p.json", tps=(1,)), "--model", "opt-13b", "--emulate-devices", "3"])
    ok = Placement(prefill=PhaseParallel(), decode=PhaseParallel(replicas=2))
    assert e.check(ok) is ok
    with pytest.raises(SystemExit, match="needs 4 devices"):
        e.check(Placement(prefill=PhaseParallel(replicas=2), decode=PhaseParallel(replicas=2)))
    with pytest.raises(SystemExit, match="no tp=2"):
        e.check(Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel()))
    small = emulation(["--emulate", e.profile_path, "--model", "opt-13b", "--emulate-memory-gib", "16"])
    with pytest.raises(SystemExit, match="leave no KV room"):
        small.check(ok)


def test_a_disaggregated_engine_on_emulated_devices_serves(tmp_path):
    e = emulation(["--emulate", write_profile(tmp_path / "p.json"), "--model", "opt-13b", "--emulate-link-gbps", "800"])
    placement = Placement(prefill=PhaseParallel(tp=2), decode=PhaseParallel(replicas=2))
    engine = e.build_engine(placement, scheduler=SchedulerConfig(max_num_seqs=8), block_size=16)
    assert isinstance(engine, DisaggEngine)
    assert [[d.id for d in i.runner.devices()] for i in engine.prefill + engine.decode] == [[0, 1], [2], [3]]
    reqs = [Request(request_id=f"r{i}", prompt_token_ids=[9] * (40 + i), sampling=SamplingParams(max_tokens=4 + i),
                    seed=0, eos_token_ids=(2,)) for i in range(6)]
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    assert [len(r.output_token_ids) for r in reqs] == [4, 5, 6, 7, 8, 9]
    block = PRESETS["opt-13b"].kv_bytes_per_token(2) * 16
    assert sum(d.bytes_pulled for d in engine.decode) == sum(-(-(40 + i) // 16) * block for i in range(6))
    assert all(d.migrations > 0 for d in engine.decode)


def test_distserve_a100_profile_loads():
    path = str(distserve_profile())
    e = emulation(["--emulate", path, "--model", "opt-66b", "--emulate-devices", "16"])
    lat = load_profile(path).latency("opt-66b", tp=4, pp=2)
    assert e.latency(4, 2).prefill_s(512, 512**2) == lat.prefill_s(512, 512**2)
    e.check(Placement(prefill=PhaseParallel(tp=4, pp=2), decode=PhaseParallel(tp=8)))


@pytest.mark.parametrize("mode", ["colocated", "chunked"])
def test_colocated_and_chunked_engines_on_emulated_devices(tmp_path, mode):
    e = emulation(["--emulate", write_profile(tmp_path / "p.json"), "--model", "opt-13b"])
    phase = PhaseParallel(tp=2, replicas=2)
    engine = e.build_engine(Placement(prefill=phase, decode=phase, mode=mode),
                            scheduler=SchedulerConfig(max_num_seqs=4, max_prefill_tokens=64), block_size=16)
    reqs = [Request(request_id=f"r{i}", prompt_token_ids=[9] * (50 + 30 * i), sampling=SamplingParams(max_tokens=3 + i),
                    seed=0, eos_token_ids=(2,)) for i in range(5)]
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    assert [len(r.output_token_ids) for r in reqs] == [3, 4, 5, 6, 7]
    assert [[d.id for d in x.runner.devices()] for x in engine.engines] == [[0, 1], [2, 3]]
