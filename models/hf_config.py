"""Hugging Face `config.json` (+ `generation_config.json`) -> `ModelConfig`, with a ValueError
naming the field and value for anything the decoder cannot run exactly.

Families (`model_type`) and the decoder they map to (models/config.py has the switches):

    opt       arch "opt"
    llama     arch "llama"                       (LLaMA 1/2/3/3.x)
    qwen2     arch "llama", qkv_bias             (Qwen2 / Qwen2.5)
    qwen3     arch "llama", qk_norm              (Qwen3 dense)
    mistral   arch "llama", sliding_window       (Mistral 7B v0.1-v0.3, Nemo-style head_dim)

Field mapping (HF name -> ModelConfig field):

    model_type                      arch, family
    vocab_size                      vocab_size
    hidden_size                     hidden_size
    num_hidden_layers               num_layers
    num_attention_heads             num_heads
    num_key_value_heads             num_kv_heads      (llama family; default num_attention_heads)
    head_dim                        head_dim          (llama family; default hidden_size // num_attention_heads,
                                                       qwen3: 128 as HF's Qwen3Config)
    intermediate_size | ffn_dim     ffn_size          (llama family | opt)
    max_position_embeddings         max_position
    rms_norm_eps                    norm_eps          (llama family; OPT's LayerNorm uses 1e-5)
    rope_parameters | rope_scaling  rope_theta, rope_scaling (models/config.py RopeScaling)
    sliding_window                  sliding_window    (mistral; None when >= max_position_embeddings)
    tie_word_embeddings             tie_embeddings    (default: opt True, others False)
    bos_token_id, eos_token_id      bos_token_id, eos_token_id (config.json first, else generation_config.json)
    eos_token_id of both files      eos_token_ids     (every id, config.json's first)
    generation_config.json          generation        (do_sample, temperature, top_p, top_k)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.config import GenerationDefaults, ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("opt", "llama", "qwen2", "qwen3", "mistral")
_OPT_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which HF OPT uses
_MISTRAL_DEFAULT_WINDOW = 4096  # HF MistralConfig's default when config.json has no sliding_window
_QWEN3_DEFAULT_HEAD_DIM = 128  # HF Qwen3Config's default when config.json has no head_dim


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ValueError(f"{path} not found: a Hugging Face checkpoint directory needs a config.json")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint directory (ValueError if absent or not JSON)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    return _read_json(model_dir / "config.json", required=True)


def read_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed `generation_config.json`, or {} when the directory has none."""
    return _read_json(Path(model_dir) / "generation_config.json", required=False)


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    """A checkpoint directory's `ModelConfig` from config.json and generation_config.json."""
    model_dir = Path(model_dir)
    return config_from_hf(read_hf_config(model_dir), name=model_dir.resolve().name,
                          source=str(model_dir / "config.json"), generation=read_generation_config(model_dir))


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def eos_token_ids_from_hf(hf: dict[str, Any]) -> tuple[int, ...]:
    """Every EOS id of a config (LLaMA-3.1 lists several); `ModelConfig.eos_token_id` keeps the first."""
    value = hf.get("eos_token_id")
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{source} lacks {key!r}, which a {hf.get('model_type')} config needs")
    return hf[key]


# ----------------------------------------------------------------------------- RoPE


def _rope_kind(block: dict[str, Any]) -> str:
    return block.get("rope_type", block.get("type", "default"))  # "type": files from transformers < 4.45


def _rope_block(hf: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(field name, dict) of the RoPE settings: transformers 5 writes `rope_parameters` (theta
    included); older files a `rope_scaling` block next to a top-level `rope_theta`."""
    params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    for field, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(block, dict) or any(isinstance(v, dict) for v in block.values()):
            raise ValueError(f"{source}: {field}={block!r} is not supported (per-layer-type RoPE settings)")
    kind_p, kind_s = _rope_kind(params), _rope_kind(scaling)
    if kind_p != "default" and kind_s != "default" and kind_p != kind_s:
        raise ValueError(f"{source}: rope_parameters (rope_type={kind_p!r}) and rope_scaling (rope_type={kind_s!r}) disagree")
    if kind_p != "default" or not scaling:
        return "rope_parameters", params
    return "rope_scaling", scaling


def _rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling); rope types other than default / linear / dynamic / llama3
    (yarn, longrope, ...) and partial rotary embeddings are rejected."""
    field, block = _rope_block(hf, source)
    theta = float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = block.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial!r} is not supported; RoPE covers the whole head")
    kind = _rope_kind(block)
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "llama3"):
        raise ValueError(f"{source}: {field} has rope_type={kind!r}; supported: 'default', 'linear', 'dynamic', 'llama3'")
    factor = block.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"{source}: {field} with rope_type={kind!r} needs a positive 'factor', got {factor!r}")
    max_pos = hf.get("max_position_embeddings", 2048)
    if kind == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(factor), original_max_position=max_pos)
    if kind == "dynamic":  # HF rescales past max_position_embeddings (not original_max_position_embeddings)
        return theta, RopeScaling(rope_type="dynamic", factor=float(factor), original_max_position=max_pos)
    # llama3: HF prefers a top-level original_max_position_embeddings, then the block's, then max_position_embeddings.
    original = hf.get("original_max_position_embeddings") or block.get("original_max_position_embeddings") or max_pos
    values = {}
    for key in ("low_freq_factor", "high_freq_factor"):
        value = block.get(key)
        if not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {field} with rope_type='llama3' needs a number {key!r}, got {value!r}")
        values[key] = float(value)
    if not 0 < values["low_freq_factor"] < values["high_freq_factor"]:
        raise ValueError(f"{source}: {field} needs 0 < low_freq_factor < high_freq_factor, got "
                         f"low_freq_factor={values['low_freq_factor']}, high_freq_factor={values['high_freq_factor']}")
    return theta, RopeScaling(rope_type="llama3", factor=float(factor), original_max_position=int(original), **values)


# ----------------------------------------------------------------------------- families


def _check_opt(hf: dict[str, Any], source: str) -> None:
    if not hf.get("do_layer_norm_before", True):
        raise ValueError(
            f"{source}: do_layer_norm_before=False (post-LayerNorm OPT, e.g. opt-350m) is not supported; "
            "the decoder is pre-LayerNorm"
        )
    hidden = _require(hf, "hidden_size", source)
    proj = hf.get("word_embed_proj_dim", hidden)
    if proj != hidden:
        raise ValueError(
            f"{source}: word_embed_proj_dim={proj} != hidden_size={hidden} needs project_in/project_out layers, "
            "which are not supported (e.g. opt-350m)"
        )
    if hf.get("_remove_final_layer_norm", False):
        raise ValueError(f"{source}: _remove_final_layer_norm=True is not supported")
    if not hf.get("enable_bias", True):
        raise ValueError(f"{source}: enable_bias=False is not supported; OPT layers carry biases")
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError(f"{source}: layer_norm_elementwise_affine=False is not supported")
    act = hf.get("activation_function", "relu")
    if act != "relu":
        raise ValueError(f"{source}: activation_function={act!r} is not supported; OPT here uses relu")


def _qwen_window(hf: dict[str, Any], source: str) -> None:
    """Qwen2/3 slide only on layers >= max_window_layers (or those `layer_types` marks), and only
    with use_sliding_window; released checkpoints leave it off. Any layer that would slide within
    the context is rejected (per-layer windows are not implemented)."""
    num_layers = _require(hf, "num_hidden_layers", source)
    use = bool(hf.get("use_sliding_window", False))
    window = hf.get("sliding_window") if use else None
    types = hf.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown or len(types) != num_layers:
            raise ValueError(f"{source}: layer_types={types!r} is not supported (needs {num_layers} entries of "
                             "'full_attention' / 'sliding_attention')")
        sliding = [t == "sliding_attention" for t in types]
    else:
        first = hf.get("max_window_layers", 28)
        sliding = [window is not None and i >= first for i in range(num_layers)]
    if not any(sliding):
        return
    if window is None:
        raise ValueError(f"{source}: layer_types marks sliding_attention layers but use_sliding_window={use} / "
                         f"sliding_window={hf.get('sliding_window')!r} gives no window")
    if window < hf.get("max_position_embeddings", 2048):
        raise ValueError(
            f"{source}: use_sliding_window=True (sliding_window={window} on {sum(sliding)} of {num_layers} layers, "
            f"max_window_layers={hf.get('max_window_layers')}) is not supported; only full attention"
        )


def _llama_family(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The ModelConfig switches of a llama-skeleton family, after rejecting what it cannot run."""
    family = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported; the SwiGLU MLP uses silu")
    # HF's Qwen2 and Mistral layers ignore these flags (their biases are fixed); llama and qwen3 read them.
    flags = {"llama": ("attention_bias", "mlp_bias"), "qwen3": ("attention_bias",)}.get(family, ())
    for flag in flags:
        if hf.get(flag, False):
            raise ValueError(f"{source}: {flag}={hf[flag]!r} is not supported for model_type={family!r}")
    hidden, heads = _require(hf, "hidden_size", source), _require(hf, "num_attention_heads", source)
    head_dim = hf.get("head_dim")
    if head_dim is None and family == "qwen3":
        head_dim = _QWEN3_DEFAULT_HEAD_DIM
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads} and head_dim is unset")
        head_dim = hidden // heads
    switches: dict[str, Any] = dict(head_dim=head_dim, qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
    if family in ("qwen2", "qwen3"):
        _qwen_window(hf, source)
    if family == "mistral":
        window = hf.get("sliding_window", _MISTRAL_DEFAULT_WINDOW)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"{source}: sliding_window={window!r} must be a positive integer or null")
        # A window covering the whole context masks nothing: plain causal attention (any backend).
        if window is not None and window < hf.get("max_position_embeddings", 2048):
            switches["sliding_window"] = window
    return switches


# ----------------------------------------------------------------------------- generation_config.json


def generation_defaults(gen: dict[str, Any], source: str = "generation_config.json") -> GenerationDefaults:
    """The sampling defaults of a parsed generation_config.json (fields it leaves unset stay None)."""
    checks = {"do_sample": (bool,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,)}
    values: dict[str, Any] = {}
    for key, types in checks.items():
        value = gen.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (key != "do_sample" and isinstance(value, bool)):
            raise ValueError(f"{source}: {key}={value!r} is not a valid {types[-1].__name__}")
        values[key] = float(value) if key in ("temperature", "top_p") else value
    return GenerationDefaults(**values)


def config_from_hf(hf: dict[str, Any], *, name: str = "custom", source: str = "config.json",
                   generation: dict[str, Any] | None = None) -> ModelConfig:
    """Map a parsed HF config (and optionally its generation_config.json) to `ModelConfig`;
    `source` names the file in error messages."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = hf.get("architectures")
        raise ValueError(
            f"{source}: unsupported model_type={model_type!r} (architectures={archs}); supported: {SUPPORTED_MODEL_TYPES}"
        )
    if hf.get("quantization_config"):
        raise ValueError(f"{source}: quantized checkpoints (quantization_config) are not supported")
    generation = generation or {}
    gen_source = str(Path(source).with_name("generation_config.json"))
    hidden = _require(hf, "hidden_size", source)
    heads = _require(hf, "num_attention_heads", source)
    eos_ids = tuple(dict.fromkeys(eos_token_ids_from_hf(hf) + eos_token_ids_from_hf(generation)))
    bos = _first_id(hf.get("bos_token_id"))
    common = dict(
        name=name,
        family=model_type,
        vocab_size=_require(hf, "vocab_size", source),
        hidden_size=hidden,
        num_layers=_require(hf, "num_hidden_layers", source),
        num_heads=heads,
        max_position=hf.get("max_position_embeddings", 2048),
        bos_token_id=bos if bos is not None else _first_id(generation.get("bos_token_id")),
        eos_token_id=eos_ids[0] if eos_ids else None,
        eos_token_ids=eos_ids,
        generation=generation_defaults(generation, gen_source),
    )
    if model_type == "opt":
        _check_opt(hf, source)
        if hidden % heads:
            raise ValueError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        return ModelConfig(
            **common, arch="opt", num_kv_heads=heads, head_dim=hidden // heads, ffn_size=_require(hf, "ffn_dim", source),
            norm_eps=_OPT_LAYER_NORM_EPS, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    switches = _llama_family(hf, source)
    theta, scaling = _rope(hf, source)
    return ModelConfig(
        **common,
        **switches,
        arch="llama",
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_size=_require(hf, "intermediate_size", source),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
