"""Weights: Hugging Face safetensors checkpoints, random init for presets, Orbax save/restore.

The target is the params tree documented in models/transformer.py. HF `nn.Linear` weights are
stored [out, in]; ours are [in, out] with the head axes split out:

    HF q_proj.weight [H*D, E]   -> attn/q [E, H, D]     (transpose, then split the output axis)
    HF o_proj.weight [E, H*D]   -> attn/o [H, D, E]     (transpose, then split the input axis)
    HF q_proj.bias   [H*D]      -> attn/q_bias [H, D]   (OPT, Qwen2)
    HF q_norm.weight [D]        -> attn/q_norm/scale [D] (Qwen3; k_norm likewise)
    HF fc1 / gate_proj [F, E]   -> [E, F]; fc2 / down_proj [E, F] -> [F, E]
    HF lm_head.weight [V, E]    -> lm_head/kernel [E, V] (only when embeddings are not tied)

Names are matched after dropping the `model.` prefix (and OPT's `decoder.`), so checkpoints saved
from the bare `LlamaModel` / `OPTModel` load too. Qwen2, Qwen3 and Mistral use LLaMA's names
plus the tensors their switches add (models/config.py). docs/weights.md has the full table.

Loading maps one tensor at a time from the file and places it by itself, straight onto the devices
that hold it with their sharding (models/placement.py), so no whole copy of the model is ever made
on the host or on one device. `WeightSource` (from `open_weights`) is a model's weights before they
are read: runners load each pipeline stage's share from it onto the stage's mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models.config import PRESETS, ModelConfig
from models.hf_config import load_hf_config
from models.placement import Shardings, TreePath, insert, lookup, place
from models.safetensors_files import by_file, checkpoint_files, header, map_tensor, tensor_info
from models.transformer import CausalLM

Params = dict[str, Any]
Put = Callable[[TreePath, np.ndarray], Any]

# Weight dtypes by name, as the CLIs and the offline API spell them.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Tensors some checkpoints carry that the decoder recomputes or never reads.
_UNUSED_SUFFIXES = (".rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- name mapping


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def _in_heads(w: np.ndarray, *, heads: int, head_dim: int) -> np.ndarray:
    """[H*D, E] (HF q/k/v) -> [E, H, D]."""
    return w.T.reshape(w.shape[1], heads, head_dim)


def _out_heads(w: np.ndarray, *, heads: int, head_dim: int) -> np.ndarray:
    """[E, H*D] (HF o_proj / out_proj) -> [H, D, E]."""
    return w.T.reshape(heads, head_dim, w.shape[0])


def _bias_heads(b: np.ndarray, *, heads: int, head_dim: int) -> np.ndarray:
    """[H*D] -> [H, D]."""
    return b.reshape(heads, head_dim)


def _keep(w: np.ndarray) -> np.ndarray:
    return w


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One checkpoint tensor: its HF name (prefix dropped), HF shape, and where it lands in our tree."""

    hf_name: str
    hf_shape: tuple[int, ...]
    path: TreePath
    convert: Callable[[np.ndarray], np.ndarray]


def _llama_tensors(c: ModelConfig) -> list[_Tensor]:
    e, h, hkv, d, f, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.ffn_size, c.vocab_size
    q_in = functools.partial(_in_heads, heads=h, head_dim=d)
    kv_in = functools.partial(_in_heads, heads=hkv, head_dim=d)
    o_out = functools.partial(_out_heads, heads=h, head_dim=d)
    q_bias = functools.partial(_bias_heads, heads=h, head_dim=d)
    kv_bias = functools.partial(_bias_heads, heads=hkv, head_dim=d)
    specs = [_Tensor("embed_tokens.weight", (v, e), ("embed", "tokens"), _keep)]
    for i in range(c.num_layers):
        hf, ours = f"layers.{i}.", f"layers_{i}"
        specs += [
            _Tensor(hf + "input_layernorm.weight", (e,), (ours, "attn_norm", "scale"), _keep),
            _Tensor(hf + "self_attn.q_proj.weight", (h * d, e), (ours, "attn", "q"), q_in),
            _Tensor(hf + "self_attn.k_proj.weight", (hkv * d, e), (ours, "attn", "k"), kv_in),
            _Tensor(hf + "self_attn.v_proj.weight", (hkv * d, e), (ours, "attn", "v"), kv_in),
            _Tensor(hf + "self_attn.o_proj.weight", (e, h * d), (ours, "attn", "o"), o_out),
            _Tensor(hf + "post_attention_layernorm.weight", (e,), (ours, "mlp_norm", "scale"), _keep),
            _Tensor(hf + "mlp.gate_proj.weight", (f, e), (ours, "mlp", "gate"), _transpose),
            _Tensor(hf + "mlp.up_proj.weight", (f, e), (ours, "mlp", "up"), _transpose),
            _Tensor(hf + "mlp.down_proj.weight", (e, f), (ours, "mlp", "down"), _transpose),
        ]
        if c.qkv_bias:  # Qwen2
            specs += [
                _Tensor(hf + "self_attn.q_proj.bias", (h * d,), (ours, "attn", "q_bias"), q_bias),
                _Tensor(hf + "self_attn.k_proj.bias", (hkv * d,), (ours, "attn", "k_bias"), kv_bias),
                _Tensor(hf + "self_attn.v_proj.bias", (hkv * d,), (ours, "attn", "v_bias"), kv_bias),
            ]
        if c.qk_norm:  # Qwen3: one [D] scale shared by every head
            specs += [
                _Tensor(hf + "self_attn.q_norm.weight", (d,), (ours, "attn", "q_norm", "scale"), _keep),
                _Tensor(hf + "self_attn.k_norm.weight", (d,), (ours, "attn", "k_norm", "scale"), _keep),
            ]
    specs.append(_Tensor("norm.weight", (e,), ("final_norm", "scale"), _keep))
    if not c.tie_embeddings:
        specs.append(_Tensor("lm_head.weight", (v, e), ("lm_head", "kernel"), _transpose))
    return specs


def _opt_tensors(c: ModelConfig) -> list[_Tensor]:
    e, h, d, f, v = c.hidden_size, c.num_heads, c.head_dim, c.ffn_size, c.vocab_size
    heads_in = functools.partial(_in_heads, heads=h, head_dim=d)
    heads_bias = functools.partial(_bias_heads, heads=h, head_dim=d)
    heads_out = functools.partial(_out_heads, heads=h, head_dim=d)
    specs = [
        _Tensor("embed_tokens.weight", (v, e), ("embed", "tokens"), _keep),
        # OPT's table has 2 extra leading rows (row = position + 2); ours keeps the same layout.
        _Tensor("embed_positions.weight", (c.max_position + 2, e), ("embed", "positions"), _keep),
    ]
    for i in range(c.num_layers):
        hf, ours = f"layers.{i}.", f"layers_{i}"
        for proj in ("q", "k", "v"):
            specs += [
                _Tensor(hf + f"self_attn.{proj}_proj.weight", (e, e), (ours, "attn", proj), heads_in),
                _Tensor(hf + f"self_attn.{proj}_proj.bias", (e,), (ours, "attn", f"{proj}_bias"), heads_bias),
            ]
        specs += [
            _Tensor(hf + "self_attn.out_proj.weight", (e, e), (ours, "attn", "o"), heads_out),
            _Tensor(hf + "self_attn.out_proj.bias", (e,), (ours, "attn", "o_bias"), _keep),
            _Tensor(hf + "self_attn_layer_norm.weight", (e,), (ours, "attn_norm", "scale"), _keep),
            _Tensor(hf + "self_attn_layer_norm.bias", (e,), (ours, "attn_norm", "bias"), _keep),
            _Tensor(hf + "final_layer_norm.weight", (e,), (ours, "mlp_norm", "scale"), _keep),
            _Tensor(hf + "final_layer_norm.bias", (e,), (ours, "mlp_norm", "bias"), _keep),
            _Tensor(hf + "fc1.weight", (f, e), (ours, "mlp", "fc1"), _transpose),
            _Tensor(hf + "fc1.bias", (f,), (ours, "mlp", "fc1_bias"), _keep),
            _Tensor(hf + "fc2.weight", (e, f), (ours, "mlp", "fc2"), _transpose),
            _Tensor(hf + "fc2.bias", (e,), (ours, "mlp", "fc2_bias"), _keep),
        ]
    specs += [
        _Tensor("final_layer_norm.weight", (e,), ("final_norm", "scale"), _keep),
        _Tensor("final_layer_norm.bias", (e,), ("final_norm", "bias"), _keep),
    ]
    if not c.tie_embeddings:
        specs.append(_Tensor("lm_head.weight", (v, e), ("lm_head", "kernel"), _transpose))
    return specs


def hf_tensor_specs(config: ModelConfig) -> list[_Tensor]:
    """Every tensor a checkpoint of this config must hold, in our tree order."""
    return _llama_tensors(config) if config.arch == "llama" else _opt_tensors(config)


def _short_name(name: str, arch: str) -> str:
    """Drop the `model.` prefix (and OPT's `decoder.`), so bare-backbone saves map the same way."""
    if name.startswith("model."):
        name = name[len("model."):]
    if arch == "opt" and name.startswith("decoder."):
        name = name[len("decoder."):]
    return name


def _full_name(short: str, arch: str) -> str:
    """The name as `*ForCausalLM.save_pretrained` writes it (for error messages)."""
    if short == "lm_head.weight":
        return short
    return ("model.decoder." if arch == "opt" else "model.") + short


# ----------------------------------------------------------------------------- loading


def load_hf_checkpoint(model_dir: str | os.PathLike, *, dtype: Any, put: Put | None = None,
                       shardings: Shardings | None = None) -> tuple[ModelConfig, Params]:
    """Read a Hugging Face checkpoint directory (OPT, LLaMA, Qwen2, Qwen3, Mistral) into (ModelConfig, params).

    `model_dir` holds `config.json` and `model.safetensors` or shards with `model.safetensors.index.json`.
    Every weight is cast to `dtype`. Each tensor is read through a memory map of its own bytes and
    placed by itself (models/placement.py): with `shardings` (a nested mapping shaped like the params
    tree, over any subset of it, of `jax.sharding.Sharding`s) straight onto its devices, each
    device's block converted and copied on its own, and tensors the mapping leaves out are not read
    (a pipeline stage loads only its layers); without, onto the default device. `put(tree_path,
    host_array)` instead hands each whole converted tensor to the caller. Every tensor's name and
    shape are checked before any is read: ValueError naming the file or tensor on any mismatch.
    """
    if put is not None and shardings is not None:
        raise ValueError("pass put or shardings, not both")
    model_dir = Path(model_dir)
    config = load_hf_config(model_dir)
    target = np.dtype(jnp.dtype(dtype))
    specs = {s.hf_name: s for s in hf_tensor_specs(config)}

    located: dict[str, Path] = {}
    original: dict[str, str] = {}
    unexpected = []
    for name, path in checkpoint_files(model_dir).items():
        short = _short_name(name, config.arch)
        if short in specs:
            if short in located:
                raise ValueError(f"{model_dir}: tensors {original[short]!r} and {name!r} both map to {short!r}")
            located[short], original[short] = path, name
        elif not (name.endswith(_UNUSED_SUFFIXES) or (short == "lm_head.weight" and config.tie_embeddings)):
            unexpected.append(name)
    missing = [_full_name(n, config.arch) for n in specs if n not in located]
    if missing:
        raise ValueError(
            f"checkpoint {model_dir} lacks {len(missing)} tensor(s) its config.json implies, e.g. {missing[:4]}"
        )
    if unexpected:
        raise ValueError(
            f"checkpoint {model_dir} holds {len(unexpected)} tensor(s) a {config.family or config.arch} model with "
            f"{config.num_layers} layers does not use, e.g. {sorted(unexpected)[:4]}"
        )
    try:
        for path, names in by_file(located):
            for short in names:
                shape = tuple(tensor_info(path, original[short])["shape"])
                if shape != specs[short].hf_shape:
                    raise ValueError(f"{path.name}: tensor {original[short]!r} has shape {shape}, "
                                     f"expected {specs[short].hf_shape} from config.json")
        params: Params = {}
        for path, names in by_file(located):
            for short in names:
                spec = specs[short]
                wanted, sharding = lookup(shardings, spec.path)
                if not wanted:
                    continue
                view = spec.convert(map_tensor(path, original[short]))  # a view: transposes and reshapes copy nothing
                insert(params, spec.path, put(spec.path, np.array(view, dtype=target, order="C")) if put else place(view, sharding, target))
                del view  # unmaps the tensor
    finally:
        header.cache_clear()
    return config, params


# ----------------------------------------------------------------------------- presets and dummy weights


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A model's weights before they are read: a checkpoint directory, or random init from `seed`
    (`model_dir` None). `load(shardings)` reads or draws them tensor by tensor straight onto their
    devices; the source holds no arrays, so keeping it costs nothing."""

    config: ModelConfig
    dtype: Any
    model_dir: Path | None = None
    seed: int = 0

    def load(self, shardings: Shardings | None = None) -> Params:
        """The weights `shardings` covers, each placed with its sharding (None: all of them, on the
        default device); see load_hf_checkpoint and CausalLM.init."""
        if self.model_dir is None:
            return CausalLM(config=self.config, dtype=jnp.dtype(self.dtype)).init(jax.random.PRNGKey(self.seed), shardings)
        return load_hf_checkpoint(self.model_dir, dtype=self.dtype, shardings=shardings)[1]


def open_weights(name_or_path: str | os.PathLike, *, dtype: Any, dummy_weights: bool = False, seed: int = 0) -> WeightSource:
    """A preset name or a HF checkpoint directory -> its `WeightSource`, reading only the config.

    Presets have no weights: they need `dummy_weights=True` (random init from `seed`). A directory
    loads its safetensors, or with `dummy_weights=True` only its config.json, with random weights.
    """
    name, path = str(name_or_path), Path(name_or_path)
    if not path.is_dir():
        if name not in PRESETS:
            raise ValueError(f"{name!r} is neither a checkpoint directory nor a preset; presets: {sorted(PRESETS)}")
        if not dummy_weights:
            raise ValueError(f"preset {name!r} has no weights: pass dummy_weights=True for random ones, or a checkpoint directory")
        return WeightSource(PRESETS[name], dtype, None, seed)
    return WeightSource(load_hf_config(path), dtype, None if dummy_weights else path, seed)


def load_model(name_or_path: str | os.PathLike, *, dtype: Any, dummy_weights: bool = False, seed: int = 0,
               shardings: Shardings | None = None) -> tuple[ModelConfig, Params]:
    """`open_weights(...)`'s config and its weights, loaded (see WeightSource.load for `shardings`)."""
    source = open_weights(name_or_path, dtype=dtype, dummy_weights=dummy_weights, seed=seed)
    return source.config, source.load(shardings)


# ----------------------------------------------------------------------------- Orbax


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_params(path: str | os.PathLike, params: Params, *, overwrite: bool = False) -> None:
    """Write params to an Orbax checkpoint directory (blocks until the write is committed)."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
    ckpt = _checkpointer()
    ckpt.save(path, params, force=overwrite)
    ckpt.wait_until_finished()


def _stored_tree(ckpt, path: Path) -> Any:
    """The checkpoint's tree of array metadata (shape, dtype), across Orbax metadata API versions."""
    meta = ckpt.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def _abstract_from_config(ckpt, path: Path, config: ModelConfig, dtype: Any) -> Params:
    """ShapeDtypeStructs for `config`, checked against the stored shapes (dtype: `dtype` or as stored)."""
    expected = nn.meta.unbox(CausalLM(config=config, dtype=jnp.dtype(dtype or jnp.float32)).abstract_params())
    stored = _stored_tree(ckpt, path)
    flat_expected = dict(_flatten(expected))
    flat_stored = dict(_flatten(stored))
    if set(flat_expected) != set(flat_stored):
        missing = sorted("/".join(p) for p in set(flat_expected) - set(flat_stored))
        extra = sorted("/".join(p) for p in set(flat_stored) - set(flat_expected))
        raise ValueError(f"{path} does not match config {config.name!r}: missing {missing[:4]}, unexpected {extra[:4]}")
    out: Params = {}
    for key, want in flat_expected.items():
        got = tuple(flat_stored[key].shape)
        if got != tuple(want.shape):
            raise ValueError(f"{path}: {'/'.join(key)} has shape {got}, expected {tuple(want.shape)} for config {config.name!r}")
        insert(out, key, jax.ShapeDtypeStruct(want.shape, jnp.dtype(dtype) if dtype else flat_stored[key].dtype))
    return out


def _flatten(tree: Any, prefix: TreePath = ()) -> Iterator[tuple[TreePath, Any]]:
    """(path, leaf) pairs of a nested mapping (plain dicts or Orbax's metadata mappings)."""
    if isinstance(tree, Mapping):
        for key in tree:
            yield from _flatten(tree[key], prefix + (str(key),))
    else:
        yield prefix, tree


def restore_params(path: str | os.PathLike, target: ModelConfig | Params | None = None, *, dtype: Any = None) -> Params:
    """Read params saved by `save_params`.

    `target` is a `ModelConfig` (shapes checked against it; dtype `dtype` or as stored), a pytree
    of `jax.ShapeDtypeStruct`/arrays (their shapes, dtypes and shardings are honoured; `dtype`
    overrides the dtype), or None (everything as stored, cast to `dtype` if given).
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise ValueError(f"Orbax checkpoint directory {path} does not exist")
    ckpt = _checkpointer()
    if isinstance(target, ModelConfig):
        abstract = _abstract_from_config(ckpt, path, target, dtype)
    elif target is None:
        abstract = None
        if dtype is not None:
            abstract = {}
            for key, meta in _flatten(_stored_tree(ckpt, path)):
                insert(abstract, key, jax.ShapeDtypeStruct(tuple(meta.shape), jnp.dtype(dtype)))
    else:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype) if dtype else x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )
    return ckpt.restore(path, abstract) if abstract is not None else ckpt.restore(path)

