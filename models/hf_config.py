"""Hugging Face `config.json` -> `ModelConfig`, with clear errors for what the decoder cannot run.

Field mapping (HF name -> ModelConfig field):

    model_type                      arch ("opt" | "llama"; anything else is rejected)
    vocab_size                      vocab_size
    hidden_size                     hidden_size
    num_hidden_layers               num_layers
    num_attention_heads             num_heads
    num_key_value_heads             num_kv_heads      (llama; default num_attention_heads)
    head_dim                        head_dim          (llama; default hidden_size // num_attention_heads)
    intermediate_size | ffn_dim     ffn_size          (llama | opt)
    max_position_embeddings         max_position
    rms_norm_eps                    norm_eps          (llama; OPT's LayerNorm uses 1e-5)
    rope_parameters.rope_theta      rope_theta        (transformers 5; older files: top-level rope_theta)
    tie_word_embeddings             tie_embeddings    (default: opt True, llama False)
    bos_token_id, eos_token_id      bos_token_id, eos_token_id (a list of EOS ids keeps the first;
                                    `eos_token_ids_from_hf` returns all of them)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("opt", "llama")
_OPT_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which HF OPT uses


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint directory (ValueError if absent or not JSON)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: a Hugging Face checkpoint directory needs a config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


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


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    """RoPE base frequency; any RoPE scaling variant (linear, dynamic, yarn, llama3...) is rejected."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for field, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"{source}: {field} has rope_type={kind!r}; only plain RoPE (rope_type='default') is implemented"
            )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


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


def _check_llama(hf: dict[str, Any], source: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported; LLaMA's SwiGLU uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise ValueError(f"{source}: {flag}=True is not supported; the LLaMA decoder has no biases")


def config_from_hf(hf: dict[str, Any], *, name: str = "custom", source: str = "config.json") -> ModelConfig:
    """Map a parsed HF config to `ModelConfig`; `source` names the file in error messages."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = hf.get("architectures")
        raise ValueError(
            f"{source}: unsupported model_type={model_type!r} (architectures={archs}); supported: {SUPPORTED_MODEL_TYPES}"
        )
    if hf.get("quantization_config"):
        raise ValueError(f"{source}: quantized checkpoints (quantization_config) are not supported")
    hidden = _require(hf, "hidden_size", source)
    heads = _require(hf, "num_attention_heads", source)
    common = dict(
        name=name,
        arch=model_type,
        vocab_size=_require(hf, "vocab_size", source),
        hidden_size=hidden,
        num_layers=_require(hf, "num_hidden_layers", source),
        num_heads=heads,
        max_position=hf.get("max_position_embeddings", 2048),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
    )
    if model_type == "opt":
        _check_opt(hf, source)
        if hidden % heads:
            raise ValueError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        return ModelConfig(
            **common, num_kv_heads=heads, head_dim=hidden // heads, ffn_size=_require(hf, "ffn_dim", source),
            norm_eps=_OPT_LAYER_NORM_EPS, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    _check_llama(hf, source)
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads} and head_dim is unset")
        head_dim = hidden // heads
    return ModelConfig(
        **common,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        ffn_size=_require(hf, "intermediate_size", source),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf, source),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
