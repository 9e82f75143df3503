"""The OpenAI API's request bodies (pydantic) and response objects, and their mapping onto the
router's own request (`GenerateRequest`), so both fronts share one validation.

Supported: `/v1/completions` and `/v1/chat/completions` with `max_tokens` (chat also
`max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop` (a string or a list), `n` = 1,
`stream`, `stream_options.include_usage`, and vLLM's extensions `top_k` (-1 or 0 disables),
`ignore_eos`, `stop_token_ids`, and `return_token_ids` (each choice or chunk also carries the
generated `token_ids`: what a benchmark needs to time tokens, not text pieces). A completion prompt is text, token ids, or a list holding one of
those. What the engine cannot do is refused with a 400 naming the field (`n` > 1, `logprobs`,
`echo`, `best_of` > 1, `min_tokens` > 0, penalties), never silently ignored.

Chat prompts: a checkpoint whose tokenizer files carry a chat template (tokenizer_config.json or
chat_template.jinja) is prompted with that template rendered as transformers renders it, with the
generation cue, sent as token ids (special tokens once). The presets ship none, so their messages
are joined by a documented plain template, one line per message and a cue for the reply:

    system: You are terse.
    user: Hello!
    assistant:
"""

from __future__ import annotations

import time
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from dsjax.engine.request import FinishReason
from serving.proto.dsjax.v1 import dsjax_pb2 as pb

INT32_MAX = 2**31 - 1

# The engine's finish reasons as OpenAI names them (EOS and stop ids/strings are all "stop").
FINISH_NAMES = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop",
                FinishReason.CANCELLED: "abort"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's own server does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    # vLLM's extensions
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    return_token_ids: bool = False

    def unsupported(self) -> str | None:
        """The first requested feature the engine lacks, as a message naming the field."""
        if self.n != 1:
            return f"n={self.n}: only n=1 is supported (send the request n times)"
        if self.logprobs not in (None, False, 0):
            return f"logprobs={self.logprobs!r} is not supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported (must be 0)"
        if self.min_tokens:
            return f"min_tokens={self.min_tokens} is not supported (must be 0)"
        return None

    def sampling_proto(self, max_tokens: int | None) -> pb.SamplingParams:
        """The proto the shared validation reads (`SamplingParams` checks the values); refused
        here is only what the proto cannot hold, and what OpenAI spells differently (top_k -1)."""
        _check_width("max_tokens", max_tokens, 32)
        _check_width("seed", self.seed, 64)
        for t in self.stop_token_ids or ():
            _check_width("stop_token_ids", t, 32)
        if self.top_k is not None and not -1 <= self.top_k <= INT32_MAX:
            raise ValueError(f"top_k={self.top_k!r} must be -1 or 0 (disabled) or a positive integer")
        msg = pb.SamplingParams(top_k=max(0, self.top_k or 0), ignore_eos=self.ignore_eos,
                                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or ()),
                                stop_token_ids=list(self.stop_token_ids or ()))
        for name, value in (("max_tokens", max_tokens), ("temperature", self.temperature), ("top_p", self.top_p),
                            ("seed", self.seed)):
            if value is not None:
                setattr(msg, name, value)
        return msg

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo=true is not supported"
        if self.best_of not in (None, 1):
            return f"best_of={self.best_of}: only 1 is supported"
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()

    def to_proto(self) -> pb.GenerateRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"prompt holds {len(prompt)} prompts: send one prompt per request")
            prompt = prompt[0]
        sampling = self.sampling_proto(self.max_tokens)
        if isinstance(prompt, str):
            return pb.GenerateRequest(text=prompt, sampling=sampling)
        if any(not 0 <= t <= INT32_MAX for t in prompt):
            raise ValueError(f"prompt token ids hold ids outside the vocabulary: {[t for t in prompt if t < 0][:8]}")
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def to_proto(self, tokenizer=None) -> pb.GenerateRequest:
        """With a tokenizer that carries the checkpoint's chat template, the prompt is that template
        rendered as transformers renders it (token ids, special tokens included once); else the
        plain template of the module docstring, as text."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        sampling = self.sampling_proto(max_tokens)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            messages = [{"role": m.role, "content": m.text()} for m in self.messages]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling)
        return pb.GenerateRequest(text=chat_prompt(self.messages), sampling=sampling)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The plain chat template of the module docstring."""
    return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"


def _check_width(name: str, value: int | None, bits: int) -> None:
    """A ValueError naming the field when `value` does not fit the proto's signed `bits`-bit int."""
    if value is not None and not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        raise ValueError(f"{name}={value!r} is out of range")


# ---- responses --------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish: str | None, use: dict | None, *, chunk: bool,
               token_ids: list[int] | None = None) -> dict:
    """A whole `text_completion`, or one streamed chunk of it (`use` None: no usage field)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    out = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [choice]}
    if use is not None or not chunk:
        out["usage"] = use
    return out


def chat_completion(rid: str, model: str, text: str, finish: str | None, use: dict,
                    token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}


def usage_chunk(rid: str, model: str, use: dict, *, chat: bool) -> dict:
    """The last chunk with `stream_options.include_usage`: no choices, only usage."""
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "created": int(time.time()), "model": model,
            "object": "chat.completion.chunk" if chat else "text_completion", "choices": [], "usage": use}


def error_body(message: str, *, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
