"""The public API's checks: a `GenerateRequest` -> prompt token ids and `SamplingParams`, or a
ValueError naming the offending field (the router turns it into INVALID_ARGUMENT).

Reuses the engine's own checks: `SamplingParams.__post_init__` (max_tokens, temperature, top_p,
top_k, seed, stop) and `dsjax.engine.request.validate_prompt` (empty, vocabulary, context length); adds the
server's limits (request size, max_tokens cap, stop lists). Plain Python: no jax.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

from dsjax.engine.request import validate_prompt
from dsjax.engine.sampling_params import SamplingParams
from models.config import PRESETS, ModelConfig
from models.hf_config import load_hf_config
from serving.proto.dsjax.v1 import dsjax_pb2 as pb

_DEFAULTS = SamplingParams()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """Server-side limits on one request, on top of the model's context length."""

    max_request_bytes: int = 1 << 20  # serialized GenerateRequest; gRPC's own cap is set above it
    max_tokens: int | None = None  # None: up to the context length
    max_model_len: int | None = None  # prompt + output tokens; None: the model's context length
    max_stop: int = 16  # stop strings and stop token ids, each
    max_stop_chars: int = 256

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes={self.max_request_bytes} must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2")


def model_config(model: str) -> ModelConfig:
    """A preset's or checkpoint directory's config without loading weights (for the router)."""
    path = Path(model)
    if path.is_dir():
        return load_hf_config(path)  # config.json and generation_config.json (every EOS id, sampling defaults)
    if model not in PRESETS:
        raise ValueError(f"model={model!r} is neither a checkpoint directory nor a preset; presets: {sorted(PRESETS)}")
    return PRESETS[model]


def checkpoint_defaults(config: ModelConfig) -> SamplingParams:
    """SamplingParams' defaults with the temperature and top_p of the checkpoint's
    generation_config.json (do_sample false: greedy). top_k stays the request's own: the proto's
    top_k has no "unset" (0 disables it)."""
    given = config.generation.sampling_kwargs()
    return SamplingParams(**{k: given[k] for k in ("temperature", "top_p") if k in given})


def sampling_from_proto(msg: pb.SamplingParams, limits: Limits, max_position: int,
                        defaults: SamplingParams = _DEFAULTS) -> SamplingParams:
    """Unset optional fields take `defaults` (SamplingParams' own, or `checkpoint_defaults`); set
    ones are validated as given."""
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else defaults.max_tokens
    cap = min(limits.max_tokens or max_position, max_position)
    if max_tokens > cap:
        raise ValueError(f"max_tokens={max_tokens} is over the server's limit of {cap}")
    temperature = msg.temperature if msg.HasField("temperature") else defaults.temperature
    top_p = msg.top_p if msg.HasField("top_p") else defaults.top_p
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
    if len(msg.stop) > limits.max_stop or len(msg.stop_token_ids) > limits.max_stop:
        raise ValueError(f"stop and stop_token_ids may hold at most {limits.max_stop} entries each")
    if any(len(s) > limits.max_stop_chars for s in msg.stop):
        raise ValueError(f"stop strings must be at most {limits.max_stop_chars} characters")
    return SamplingParams(
        max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p), top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None, stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop), ignore_eos=bool(msg.ignore_eos),
    )


def prompt_token_ids(request: pb.GenerateRequest, tokenizer) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is empty: set either text or token_ids")
    if kind == "text":
        if not request.text:
            raise ValueError("prompt is empty: text must be non-empty")
        return tokenizer.encode(request.text)
    return [int(t) for t in request.token_ids.ids]


def validate_request(request: pb.GenerateRequest, tokenizer, config: ModelConfig, limits: Limits) -> tuple[list[int], SamplingParams]:
    """-> (prompt token ids, SamplingParams); ValueError names the field that is wrong."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise ValueError(f"request is {size} bytes, over the server's message limit of {limits.max_request_bytes} bytes")
    context = min(config.max_position, limits.max_model_len or config.max_position)
    sampling = sampling_from_proto(request.sampling, limits, context, checkpoint_defaults(config))
    ids = prompt_token_ids(request, tokenizer)
    check_token_ids(ids, config.vocab_size, "prompt token_ids")
    check_token_ids(sampling.stop_token_ids, config.vocab_size, "stop_token_ids")
    validate_prompt(ids, sampling, vocab_size=config.vocab_size, max_position=context)
    return ids, sampling


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{field} hold ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")
