"""Static model configuration and the named presets.

`ModelConfig` is frozen, keyword-only and hashable so it can be a static argument of a jitted
program. Two decoder skeletons (`arch`) cover every supported Hugging Face family (`family`,
the checkpoint's `model_type`):

- ``"opt"``: learned absolute positions (row = position + 2, OPT's offset), pre-LayerNorm with
  biases, ReLU MLP, multi-head attention, biases on every projection, tied LM head.
- ``"llama"``: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, optionally tied embeddings.
  Families differ only by the switches below (models/hf_config.py sets them):

      family    qkv_bias  qk_norm  sliding_window        rope_scaling
      llama     -         -        -                     linear | dynamic | llama3
      qwen2     yes       -        - (refused)           as llama
      qwen3     -         yes      - (refused)           as llama
      mistral   -         -        when shorter than     as llama
                                   max_position

Generation metadata rides along for the serving layer and never changes the programs:
`eos_token_ids` (every id that ends generation) and `generation` (sampling defaults of
generation_config.json).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ARCHS = ("opt", "llama")
ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, as HF's `rope_type` (models/rope.py computes the frequencies).

    - ``linear``: every inverse frequency divided by `factor`.
    - ``dynamic`` (NTK): HF rescales the base only while a sequence is longer than
      `original_max_position` (its `max_position_embeddings`), with a base that depends on that
      sequence's current length; within it the frequencies are plain RoPE. The model's
      `max_position` may not exceed `original_max_position` (ModelConfig checks), so the
      engine's context limit keeps every request in the exact regime.
    - ``llama3``: wavelengths longer than original_max_position / low_freq_factor are divided by
      `factor`, shorter than original_max_position / high_freq_factor kept, and those between
      interpolated smoothly.
    """

    rope_type: Literal["linear", "dynamic", "llama3"]
    factor: float
    original_max_position: int  # llama3: pre-training context; dynamic: where rescaling would start
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} must be one of {ROPE_SCALING_TYPES}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor={self.factor!r} must be positive")
        if not isinstance(self.original_max_position, int) or self.original_max_position < 1:
            raise ValueError(f"original_max_position={self.original_max_position!r} must be a positive integer")
        if self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"llama3 RoPE needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor}, {self.high_freq_factor}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """Sampling defaults of a checkpoint's generation_config.json (None: the file leaves it unset)."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    def sampling_kwargs(self) -> dict[str, float | int]:
        """`SamplingParams` keyword defaults for a request that sets none itself: do_sample=False
        means greedy (as HF `generate` decodes it); otherwise the values the file sets."""
        if self.do_sample is False:
            return {"temperature": 0.0}
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return {k: v for k, v in values.items() if v is not None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: Literal["opt", "llama"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    max_position: int  # longest context (prompt + output) the model accepts
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama only
    rope_scaling: RopeScaling | None = None  # llama only; None = plain RoPE
    qkv_bias: bool = False  # llama only: biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False  # llama only: RMSNorm over head_dim of q and k, before RoPE (Qwen3)
    # llama only: query at position p attends keys k with p - sliding_window < k <= p (Mistral);
    # None = full causal attention.
    sliding_window: int | None = None
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # the primary EOS (tokenizers and the wire protocol carry one)
    eos_token_ids: tuple[int, ...] = ()  # every EOS id config.json / generation_config.json list
    generation: GenerationDefaults = dataclasses.field(default_factory=GenerationDefaults)
    family: str | None = None  # the HF model_type the config came from (informational)
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} must be one of {ARCHS}")
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "max_position"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        # A list would make the config unhashable (it is a static jit argument).
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window={self.sliding_window!r} must be a positive integer or None")
        if self.arch == "opt":
            if self.num_kv_heads != self.num_heads:
                raise ValueError(f"OPT uses multi-head attention: num_kv_heads={self.num_kv_heads} != num_heads={self.num_heads}")
            if self.num_heads * self.head_dim != self.hidden_size:
                raise ValueError(f"OPT needs num_heads*head_dim == hidden_size, got {self.num_heads}*{self.head_dim} != {self.hidden_size}")
            for field in ("rope_scaling", "qkv_bias", "qk_norm", "sliding_window"):
                if getattr(self, field):
                    raise ValueError(f"{field}={getattr(self, field)!r} applies to the llama decoder only, not OPT")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got head_dim={self.head_dim}")
        scaling = self.rope_scaling
        if scaling is not None and scaling.rope_type == "dynamic" and self.max_position > scaling.original_max_position:
            raise ValueError(
                f"dynamic RoPE is exact only up to original_max_position={scaling.original_max_position}; "
                f"max_position={self.max_position} exceeds it (HF rescales by each sequence's run-time length there)"
            )

    @property
    def all_eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: `eos_token_id` first, then the rest of `eos_token_ids`."""
        ids = ([] if self.eos_token_id is None else [self.eos_token_id]) + list(self.eos_token_ids)
        return tuple(dict.fromkeys(ids))

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token occupies across all layers (K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        e, f, l = self.hidden_size, self.ffn_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = e * q + 2 * e * kv + q * e
        mlp = (3 if self.arch == "llama" else 2) * e * f
        embed = self.vocab_size * e * (1 if self.tie_embeddings else 2)
        if self.arch == "opt":
            embed += (self.max_position + 2) * e
        return l * (attn + mlp) + embed


def _opt(name: str, hidden: int, layers: int, heads: int, ffn: int | None = None, vocab: int = 50272, ctx: int = 2048) -> ModelConfig:
    return ModelConfig(
        arch="opt", name=name, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, ffn_size=ffn or 4 * hidden, max_position=ctx,
        tie_embeddings=True, bos_token_id=2, eos_token_id=2,
    )


def _llama(name: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, *, vocab: int, ctx: int,
           theta: float = 10000.0, eps: float = 1e-5, bos: int = 1, eos: int = 2, tie: bool = False) -> ModelConfig:
    return ModelConfig(
        arch="llama", name=name, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hidden // heads, ffn_size=ffn, max_position=ctx, rope_theta=theta,
        norm_eps=eps, tie_embeddings=tie, bos_token_id=bos, eos_token_id=eos,
    )


# Tiny and small configs use a 512-entry vocabulary: the byte tokenizer needs 256 bytes + specials.
_TINY_VOCAB = 512
PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        _opt("opt-125m", 768, 12, 12),
        _opt("opt-1.3b", 2048, 24, 32),
        _opt("opt-2.7b", 2560, 32, 32),
        _opt("opt-6.7b", 4096, 32, 32),
        _opt("opt-13b", 5120, 40, 40),
        _opt("opt-30b", 7168, 48, 56),
        _opt("opt-66b", 9216, 64, 72),
        _opt("opt-175b", 12288, 96, 96),
        _llama("llama-2-7b", 4096, 32, 32, 32, 11008, vocab=32000, ctx=4096),
        _llama("llama-2-13b", 5120, 40, 40, 40, 13824, vocab=32000, ctx=4096),
        _llama("llama-2-70b", 8192, 80, 64, 8, 28672, vocab=32000, ctx=4096),
        _llama("llama-3-8b", 4096, 32, 32, 8, 14336, vocab=128256, ctx=8192, theta=500000.0, bos=128000, eos=128001),
        _llama("llama-3-70b", 8192, 80, 64, 8, 28672, vocab=128256, ctx=8192, theta=500000.0, bos=128000, eos=128001),
        # Test and CPU-benchmark sizes (byte tokenizer: bos=256, eos=257).
        _opt("tiny-opt", 64, 2, 4, 128, vocab=_TINY_VOCAB, ctx=512),
        _llama("tiny-llama", 64, 2, 4, 2, 128, vocab=_TINY_VOCAB, ctx=512, bos=256, eos=257),
        _llama("small-llama", 256, 4, 8, 4, 768, vocab=_TINY_VOCAB, ctx=2048, bos=256, eos=257),
        _opt("small-opt", 256, 4, 8, 1024, vocab=_TINY_VOCAB, ctx=2048),
    )
}
for _name in ("tiny-opt", "small-opt"):
    PRESETS[_name] = dataclasses.replace(PRESETS[_name], bos_token_id=256, eos_token_id=257)


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
