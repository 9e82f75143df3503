"""HF checkpoint loading (tree contract, prefixes, errors), load_model, and Orbax save/restore."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file

from models.config import PRESETS
from models.hf_config import eos_token_ids_from_hf
from models.transformer import CausalLM
from models.weights import load_hf_checkpoint, load_model, restore_params, save_params
from tests.support.hf_fixtures import make_hf_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("opt"), "opt")


@pytest.fixture(scope="module")
def llama_loaded(llama_dir):
    return load_hf_checkpoint(llama_dir, dtype=jnp.float32)


def read_tensors(model_dir) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def copy_with_tensors(src, dst: Path, tensors: dict[str, np.ndarray], config_edits: dict | None = None) -> Path:
    """A copy of checkpoint `src` whose single safetensors file holds `tensors`."""
    dst.mkdir()
    config = json.loads((Path(src) / "config.json").read_text())
    config.update(config_edits or {})
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- the params contract


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, llama_dir, opt_dir):
    dirs = {"llama": llama_dir, "opt": opt_dir}
    for family in ("qwen2", "qwen3", "mistral"):
        dirs[family] = make_hf_checkpoint(tmp_path_factory.mktemp(family), family)
    return dirs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("family", ["opt", "llama", "qwen2", "qwen3", "mistral"])
def test_tree_matches_model_init(family, dtype, family_dirs):
    config, params = load_hf_checkpoint(family_dirs[family], dtype=dtype)
    abstract = CausalLM(config=config, dtype=dtype).param_shapes()
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)


def test_qwen_tensor_layouts(family_dirs):
    """Qwen2's q/k/v biases split into heads; Qwen3's per-head norms are one [D] scale each."""
    config, params = load_hf_checkpoint(family_dirs["qwen2"], dtype=jnp.float32)
    hf = read_tensors(family_dirs["qwen2"])
    attn = params["layers_1"]["attn"]
    np.testing.assert_array_equal(attn["q_bias"], hf["model.layers.1.self_attn.q_proj.bias"].reshape(config.num_heads, -1))
    np.testing.assert_array_equal(attn["v_bias"], hf["model.layers.1.self_attn.v_proj.bias"].reshape(config.num_kv_heads, -1))
    assert config.tie_embeddings and "lm_head" not in params
    _, params = load_hf_checkpoint(family_dirs["qwen3"], dtype=jnp.float32)
    hf = read_tensors(family_dirs["qwen3"])
    np.testing.assert_array_equal(params["layers_0"]["attn"]["k_norm"]["scale"], hf["model.layers.0.self_attn.k_norm.weight"])
    assert "q_bias" not in params["layers_0"]["attn"]


def test_tensor_layouts(llama_dir, llama_loaded):
    """Spot-check the transposes/reshapes against the raw HF tensors."""
    config, params = llama_loaded
    hf = read_tensors(llama_dir)
    e, h, hkv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    layer = params["layers_1"]
    np.testing.assert_array_equal(layer["attn"]["q"], hf["model.layers.1.self_attn.q_proj.weight"].T.reshape(e, h, d))
    np.testing.assert_array_equal(layer["attn"]["k"], hf["model.layers.1.self_attn.k_proj.weight"].T.reshape(e, hkv, d))
    np.testing.assert_array_equal(layer["attn"]["o"], hf["model.layers.1.self_attn.o_proj.weight"].T.reshape(h, d, e))
    np.testing.assert_array_equal(layer["mlp"]["down"], hf["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], hf["lm_head.weight"].T)
    np.testing.assert_array_equal(params["final_norm"]["scale"], hf["model.norm.weight"])


def test_opt_positions_keep_offset_rows(opt_dir):
    config, params = load_hf_checkpoint(opt_dir, dtype=jnp.float32)
    table = read_tensors(opt_dir)["model.decoder.embed_positions.weight"]
    assert table.shape == (config.max_position + 2, config.hidden_size)
    np.testing.assert_array_equal(params["embed"]["positions"], table)
    assert config.tie_embeddings and "lm_head" not in params


def test_put_callback_places_every_tensor(llama_dir):
    seen = []

    def put(path, host):
        assert isinstance(host, np.ndarray) and host.flags.c_contiguous
        seen.append(path)
        return host

    _, params = load_hf_checkpoint(llama_dir, dtype=jnp.float32, put=put)
    assert sorted(seen) == sorted(tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


@pytest.mark.parametrize("arch, prefix", [("llama", "model."), ("opt", "model."), ("opt", "model.decoder.")])
def test_checkpoints_without_prefix_load(arch, prefix, llama_dir, opt_dir, tmp_path):
    src = llama_dir if arch == "llama" else opt_dir
    tensors = {k.removeprefix(prefix): v for k, v in read_tensors(src).items()}
    stripped = copy_with_tensors(src, tmp_path / "stripped", tensors)
    _, want = load_hf_checkpoint(src, dtype=jnp.float32)
    _, got = load_hf_checkpoint(stripped, dtype=jnp.float32)
    assert flat(got).keys() == flat(want).keys()
    for key, value in flat(want).items():
        np.testing.assert_array_equal(flat(got)[key], value)


def test_known_unused_tensors_are_ignored(llama_dir, tmp_path):
    tensors = read_tensors(llama_dir)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    load_hf_checkpoint(copy_with_tensors(llama_dir, tmp_path / "ckpt", tensors), dtype=jnp.float32)


def test_tied_checkpoint_with_redundant_lm_head_loads(llama_dir, tmp_path):
    path = copy_with_tensors(llama_dir, tmp_path / "ckpt", read_tensors(llama_dir), {"tie_word_embeddings": True})
    config, params = load_hf_checkpoint(path, dtype=jnp.float32)
    assert config.tie_embeddings and "lm_head" not in params


def test_eos_list_keeps_first(llama_dir, tmp_path):
    path = copy_with_tensors(llama_dir, tmp_path / "ckpt", read_tensors(llama_dir), {"eos_token_id": [257, 3, 4]})
    config, _ = load_hf_checkpoint(path, dtype=jnp.float32)
    assert config.eos_token_id == 257 and config.eos_token_ids == (257, 3, 4)
    assert eos_token_ids_from_hf({"eos_token_id": [257, 3, 4]}) == (257, 3, 4)


# ----------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope", dtype=jnp.float32)


def test_missing_config_json(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        load_hf_checkpoint(tmp_path, dtype=jnp.float32)


def test_no_safetensors(llama_dir, tmp_path):
    shutil.copy(Path(llama_dir) / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no \*\.safetensors files .*pytorch_model\.bin"):
        load_hf_checkpoint(tmp_path, dtype=jnp.float32)


def test_missing_shard_file(tmp_path_factory):
    path = Path(make_hf_checkpoint(tmp_path_factory.mktemp("sharded"), "llama", max_shard_size="40KB"))
    victim = sorted(path.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(ValueError, match=f"shard files that do not exist.*{victim.name}"):
        load_hf_checkpoint(path, dtype=jnp.float32)


def test_unknown_architecture(llama_dir, tmp_path):
    path = copy_with_tensors(llama_dir, tmp_path / "ckpt", read_tensors(llama_dir), {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="unsupported model_type='gpt2'"):
        load_hf_checkpoint(path, dtype=jnp.float32)


def test_missing_tensor(llama_dir, tmp_path):
    tensors = read_tensors(llama_dir)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(copy_with_tensors(llama_dir, tmp_path / "ckpt", tensors), dtype=jnp.float32)


def test_unexpected_shape(llama_dir, tmp_path):
    tensors = read_tensors(llama_dir)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.ascontiguousarray(tensors["model.layers.0.self_attn.k_proj.weight"].T)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 32\), expected \(32, 64\)"):
        load_hf_checkpoint(copy_with_tensors(llama_dir, tmp_path / "ckpt", tensors), dtype=jnp.float32)


def test_unexpected_tensor(llama_dir, tmp_path):
    tensors = read_tensors(llama_dir)
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"does not use.*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(copy_with_tensors(llama_dir, tmp_path / "ckpt", tensors), dtype=jnp.float32)


# ----------------------------------------------------------------------------- load_model


def test_load_model_preset_needs_dummy_weights():
    with pytest.raises(ValueError, match="has no weights: pass dummy_weights=True"):
        load_model("tiny-llama", dtype=jnp.float32)


def test_load_model_unknown_name():
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        load_model("no-such-model", dtype=jnp.float32)


def test_load_model_dummy_preset():
    config, params = load_model("tiny-opt", dtype=jnp.bfloat16, dummy_weights=True, seed=3)
    assert config == PRESETS["tiny-opt"]
    abstract = CausalLM(config=config, dtype=jnp.bfloat16).param_shapes()
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


def test_load_model_directory_with_dummy_weights(llama_dir, llama_loaded):
    config, params = load_model(llama_dir, dtype=jnp.float32, dummy_weights=True)
    assert config == llama_loaded[0]
    assert jax.tree.structure(params) == jax.tree.structure(llama_loaded[1])
    assert not np.array_equal(params["embed"]["tokens"], llama_loaded[1]["embed"]["tokens"])


def test_load_model_directory(llama_dir, llama_loaded):
    config, params = load_model(llama_dir, dtype=jnp.float32)
    assert config == llama_loaded[0]
    np.testing.assert_array_equal(params["embed"]["tokens"], llama_loaded[1]["embed"]["tokens"])


# ----------------------------------------------------------------------------- Orbax


def test_orbax_round_trip(llama_loaded, tmp_path):
    config, params = llama_loaded
    save_params(tmp_path / "ckpt", params)
    want = flat(params)
    for restored in (
        restore_params(tmp_path / "ckpt", config),
        restore_params(tmp_path / "ckpt", jax.eval_shape(lambda: params)),
        restore_params(tmp_path / "ckpt"),
    ):
        got = flat(restored)
        assert got.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value)
            assert got[key].dtype == np.float32

    cast = restore_params(tmp_path / "ckpt", config, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))
    np.testing.assert_array_equal(cast["layers_0"]["attn"]["q"], params["layers_0"]["attn"]["q"].astype(jnp.bfloat16))

    with pytest.raises(ValueError, match="already exists"):
        save_params(tmp_path / "ckpt", params)
    save_params(tmp_path / "ckpt", params, overwrite=True)


def test_orbax_restore_checks_config(llama_loaded, tmp_path):
    config, params = llama_loaded
    save_params(tmp_path / "ckpt", params)
    with pytest.raises(ValueError, match="does not match config"):
        restore_params(tmp_path / "ckpt", PRESETS["tiny-opt"])
    wider = dataclasses.replace(config, ffn_size=256)
    with pytest.raises(ValueError, match=r"layers_0/mlp/down has shape \(128, 64\), expected \(256, 64\)"):
        restore_params(tmp_path / "ckpt", wider)
    with pytest.raises(ValueError, match="does not exist"):
        restore_params(tmp_path / "nope", config)


def test_bf16_checkpoint_loads_exactly(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("bf16"), "opt", torch_dtype=torch.bfloat16)
    _, params = load_hf_checkpoint(path, dtype=jnp.bfloat16)
    ref = load_file(str(Path(path) / "model.safetensors"))["model.decoder.layers.0.fc1.weight"]
    assert ref.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params["layers_0"]["mlp"]["fc1"], np.float32), ref.to(torch.float32).numpy().T
    )
