"""Chat templates: the Jinja2 template a checkpoint ships, rendered the way Hugging Face renders it.

Where the template comes from (first found wins, as in transformers):

    chat_template.jinja                       (transformers >= 4.43 writes the template here)
    tokenizer_config.json "chat_template"     a string, or a list of {"name", "template"}: "default"

Rendering environment (what templates on the Hub rely on): a sandboxed, immutable Jinja2
environment with `trim_blocks` and `lstrip_blocks`, the loop-controls extension (`break`,
`continue`), a `{% generation %}...{% endgeneration %}` block rendered as its body, the globals
`raise_exception(msg)` (a TemplateError) and `strftime_now(fmt)`, and a `tojson` filter that
does not escape HTML (`json.dumps`, ensure_ascii off). The variables are `messages`,
`add_generation_prompt`, `tools` and `documents` (None unless given), the special tokens as
strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ... those tokenizer_config.json
names), and any extra keyword arguments.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens a template can read, as HF's tokenizers expose them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def find_chat_template(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The checkpoint's default chat template, or None when it ships none."""
    path = model_dir / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    value = tokenizer_config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    raise ValueError(f"{model_dir / 'tokenizer_config.json'}: chat_template has type {type(value).__name__}; "
                     "expected a string or a list of {name, template}")


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}body{% endgeneration %}` renders as body (HF uses it to mark the
        assistant's tokens for training masks; serving only needs the text)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                         special_tokens: Mapping[str, str] | None = None, tools: Sequence[Any] | None = None,
                         documents: Sequence[Any] | None = None, **kwargs: Any) -> str:
    """The prompt text for `messages` (dicts with at least "role" and "content").

    `special_tokens` maps names such as "bos_token" to their strings; keyword arguments override
    them and add variables (e.g. `enable_thinking=False` for Qwen3's template).
    """
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a mapping with 'role' and 'content', got {type(message).__name__}")
    variables = {**(special_tokens or {}), **kwargs}
    return _compile(template).render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                     tools=tools, documents=documents, **variables)
