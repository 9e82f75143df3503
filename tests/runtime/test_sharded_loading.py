"""Sharded loading (docs/weights.md): runners built from a WeightSource place every weight straight
onto their stage's mesh, tensor by tensor and block by block, so no device ever holds a whole
sharded weight and no unsharded copy of the model exists, in memory or kept after start-up."""

import gc
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import models.safetensors_files as st_files
import models.transformer as transformer
from dsjax import LLM, SamplingParams
from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.runtime.builder import build_runner, load_causal_lm
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.sharding import TP_AXIS, ShardingRules, instance_meshes, stage_shardings
from models.transformer import CausalLM
from models.weights import WeightSource, load_hf_checkpoint, restore_params, save_params
from tests.support.hf_fixtures import make_hf_checkpoint
from tests.support.load_memory import BIG_LLAMA, write_checkpoint

CACHE = CacheConfig(num_blocks=8, block_size=8)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # Several files and an index: each tensor is found through it and mapped from its own file.
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", max_shard_size="60KB")


def flat(tree) -> dict[tuple[str, ...], object]:
    return {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture
def placed(monkeypatch):
    """Every jax.make_array_from_callback call: (shape, sharding, shapes of the blocks it got)."""
    calls = []
    real = jax.make_array_from_callback

    def spy(shape, sharding, callback, *args, **kwargs):
        blocks = []
        calls.append((tuple(shape), sharding, blocks))

        def recorded(index):
            block = callback(index)
            blocks.append(block.shape)
            return block

        return real(shape, sharding, recorded, *args, **kwargs)

    monkeypatch.setattr(jax, "make_array_from_callback", spy)
    return calls


def assert_on_mesh(model, params, mesh, first, last, calls):
    """Each weight has the phase's sharding on `mesh`, came through the per-tensor path, and no
    device got a block larger than its shard (a tp-sharded weight never lands whole anywhere)."""
    want = flat(stage_shardings(model, mesh, first, last))
    got = flat(params)
    assert set(got) == set(want)
    by_shape_sharding = {(shape, sharding): blocks for shape, sharding, blocks in calls}
    for path, leaf in got.items():
        assert leaf.sharding == want[path] and leaf.sharding.device_set == set(mesh.devices.flat), path
        shard_shape = want[path].shard_shape(leaf.shape)
        assert all(s.data.shape == shard_shape for s in leaf.addressable_shards), path
        blocks = by_shape_sharding[(leaf.shape, want[path])]
        assert blocks and set(blocks) == {shard_shape}, path
        if TP_AXIS in want[path].spec:
            assert shard_shape != leaf.shape, path  # split, not replicated


def test_tp2_runner_reads_each_tensor_onto_its_mesh(llama_dir, placed):
    model, weights = load_causal_lm(llama_dir, backend="xla")
    assert isinstance(weights, WeightSource)
    devices = jax.devices()[2:4]  # not the default device
    before = {id(a) for a in jax.live_arrays()}
    runner = build_runner(model, weights, CACHE, phase=PhaseParallel(tp=2), devices=devices)
    stage = runner.stages[0]
    assert_on_mesh(model, stage.params, stage.mesh, 0, model.config.num_layers, placed)
    assert len(placed) == len(flat(stage.params))  # one placement per weight, nothing else
    assert not [a for a in jax.live_arrays() if id(a) not in before and jax.devices()[0] in a.devices()]
    _, ref = load_hf_checkpoint(llama_dir, dtype=jnp.float32)
    for path, leaf in flat(stage.params).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat(ref)[path]), err_msg=str(path))


def test_pipeline_stages_read_only_their_layers(llama_dir, placed, monkeypatch):
    mapped = []
    real_map = st_files.map_tensor
    monkeypatch.setattr("models.weights.map_tensor", lambda path, name: mapped.append(name) or real_map(path, name))
    model, weights = load_causal_lm(llama_dir, backend="xla")
    runner = build_runner(model, weights, CACHE, phase=PhaseParallel(tp=2, pp=2), devices=jax.devices()[:4])
    assert [sorted(s.params) for s in runner.stages] == [["embed", "layers_0"], ["final_norm", "layers_1", "lm_head"]]
    for s in runner.stages:
        assert_on_mesh(model, s.params, s.mesh, s.first_layer, s.last_layer, placed)
    assert sorted(mapped) == sorted(set(mapped))  # each tensor read once, by the stage that holds it
    assert len(mapped) == len(placed) == sum(len(flat(s.params)) for s in runner.stages)


def test_dummy_weights_are_drawn_sharded_and_match_the_unsharded_init(placed):
    model, weights = load_causal_lm("tiny-llama", dummy_weights=True, seed=5, backend="xla")
    runner = build_runner(model, weights, CACHE, phase=PhaseParallel(tp=2), devices=jax.devices()[4:6])
    stage = runner.stages[0]
    assert_on_mesh(model, stage.params, stage.mesh, 0, model.config.num_layers, placed)
    ref = flat(CausalLM(config=model.config).init(jax.random.PRNGKey(5)))
    for path, leaf in flat(stage.params).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref[path]), err_msg=str(path))


def test_device_drawn_dummy_weights_come_out_sharded(monkeypatch, placed):
    """Models too large to draw on the host draw on the device, compiled for each weight's sharding."""
    monkeypatch.setattr(transformer, "HOST_INIT_MAX_PARAMS", 0)
    model = CausalLM(config=load_causal_lm("tiny-llama", dummy_weights=True)[0].config)
    mesh = instance_meshes(jax.devices()[:2], PhaseParallel(tp=2)).meshes[0]
    shardings = stage_shardings(model, mesh, 0, model.config.num_layers, ShardingRules())
    sharded = flat(model.init(jax.random.PRNGKey(0), shardings))
    ref = flat(model.init(jax.random.PRNGKey(0)))
    for path, leaf in sharded.items():
        assert leaf.sharding == flat(shardings)[path], path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref[path]), err_msg=str(path))


def test_llm_tp2_keeps_no_unsharded_copy(llama_dir):
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    llm = LLM(model=llama_dir, placement=Placement(prefill=PhaseParallel(tp=2)), mode="colocated")
    gc.collect()
    full_shapes = {leaf.shape for path, leaf in flat(llm.model.param_shapes()).items()
                   if path[-1] not in ("scale",) and not path[-1].endswith("bias")}
    new = [a for a in jax.live_arrays() if id(a) not in before]
    assert new  # the runner's weights and KV pool
    whole = [a.shape for a in new if len(a.devices()) == 1 and a.shape in full_shapes]
    assert whole == []
    out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling=SamplingParams(max_tokens=2, temperature=0.0))
    assert out[0].token_ids


def test_orbax_restores_straight_to_a_tp_sharding(tmp_path):
    model = CausalLM(config=load_causal_lm("tiny-llama", dummy_weights=True)[0].config)
    save_params(tmp_path / "ckpt", model.init(jax.random.PRNGKey(0)))
    mesh = instance_meshes(jax.devices()[:2], PhaseParallel(tp=2)).meshes[0]
    shardings = stage_shardings(model, mesh, 0, model.config.num_layers)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), model.param_shapes(), shardings)
    restored = flat(restore_params(tmp_path / "ckpt", target))
    for path, sharding in flat(shardings).items():
        assert isinstance(restored[path].sharding, NamedSharding) and restored[path].sharding == sharding, path


def test_measured_checkpoint_writer_makes_loadable_checkpoints(tmp_path):
    """The slow test's checkpoint writer, at a tiny size: names and shapes the loader accepts."""
    small = dict(BIG_LLAMA, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    config, params = load_hf_checkpoint(write_checkpoint(tmp_path / "small", small), dtype=jnp.float32)
    assert config.num_layers == 2 and params["layers_1"]["mlp"]["down"].shape == (128, 64)


def _load_memory(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tests.support.load_memory", *args], capture_output=True, text=True,
                         timeout=600, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_tp4_loading_memory_on_a_200mb_checkpoint(tmp_path):
    """docs/weights.md "Sharded loading": TP4 from a 197 MB float32 llama checkpoint on 8 fake CPU
    devices: each device holds <= 0.3x the model, the process peaks <= 1.5x the model above its
    RSS before loading (device buffers are host memory here, so this counts all four shards)."""
    ckpt = _load_memory("write", str(tmp_path / "big"))
    results = {p: json.loads(_load_memory("measure", ckpt, "--tp", "4", "--path", p)) for p in ("sharded", "dummy", "whole")}
    print(json.dumps(results, indent=1))
    for p in ("sharded", "dummy"):
        r = results[p]
        assert r["model_bytes"] > 150e6
        assert r["max_device_ratio"] <= 0.3, r
        assert r["peak_rss_ratio"] <= 1.5, r
    assert results["whole"]["max_device_ratio"] > 1.0  # the old path: the whole model on device 0
