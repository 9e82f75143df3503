"""Chat templates render exactly as transformers' `apply_chat_template` on a tiny tokenizer."""

from __future__ import annotations

import json

import jinja2
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from models.config import PRESETS
from models.tokenizer import ByteTokenizer, load_tokenizer
from tests.models.test_tokenizer import byte_level_bpe

LLAMA = PRESETS["tiny-llama"]

# Exercises what Hub templates use: a namespace set in a loop, bos/eos tokens, loop controls,
# raise_exception, whitespace control through trim_blocks / lstrip_blocks (indented block tags),
# filters (trim, tojson without HTML escaping or ASCII escapes), a `{% generation %}` block, an
# extra keyword (Qwen3's enable_thinking) and the generation prompt.
TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endif -%}
{%- endfor -%}
{{ bos_token }}
{%- if ns.system %}<|system|>
{{ ns.system }}{{ eos_token }}
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
<|{{ message['role'] }}|>
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] | trim }}{{ eos_token }}{% endgeneration %}
    {% else %}
{{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if tools %}<|tools|>{{ tools | tojson }}
{% endif %}
{% if add_generation_prompt %}
<|assistant|>
    {% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{% endif %}"""

CHATS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "Be brief & <safe>."}, {"role": "user", "content": "héllo wörld, 日本語 😀"},
     {"role": "assistant", "content": "  the quick brown fox  "}, {"role": "user", "content": "and?"}],
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "prix en € <b>", "parameters": {}}}]


def _save_hf(tmp_path, name: str, template) -> str:
    """A tokenizer directory as transformers writes it (tokenizer.json, tokenizer_config.json and,
    for a string template, chat_template.jinja)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(), bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", chat_template=template)
    path = tmp_path / name
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    path = _save_hf(tmp_path_factory.mktemp("chat"), "tok", TEMPLATE)
    return load_tokenizer(path, LLAMA), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("extra", [{}, {"enable_thinking": False}, {"tools": TOOLS}], ids=["plain", "no-thinking", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_matches_transformers(tokenizers, chat, extra, add_generation_prompt):
    ours, hf = tokenizers
    messages = CHATS[chat]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
    assert got == want
    assert got.startswith("<s>")
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **extra)
    want_ids = want_ids["input_ids"] if hasattr(want_ids, "keys") else want_ids  # BatchEncoding in transformers 5
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **extra) == want_ids
    assert want_ids.count(ours.bos_token_id) == 1  # the template's BOS, none added on top


def test_template_errors_surface(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\] must be a mapping"):
        ours.apply_chat_template(["hello"])


def test_named_templates_in_tokenizer_config_pick_default(tmp_path):
    """Older files keep the template(s) in tokenizer_config.json: a string or [{name, template}]."""
    path = tmp_path / "tok"
    path.mkdir()
    byte_level_bpe().save(str(path / "tokenizer.json"))
    templates = [{"name": "tool_use", "template": "TOOLS {{ messages | length }}"}, {"name": "default", "template": TEMPLATE}]
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": templates,
    }))
    ours = load_tokenizer(path, LLAMA)
    assert ours.chat_template == TEMPLATE
    hf = AutoTokenizer.from_pretrained(str(path))
    assert ours.apply_chat_template(CHATS[1], add_generation_prompt=True) == hf.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True)


def test_without_a_template(tmp_path):
    path = tmp_path / "tok"
    path.mkdir()
    byte_level_bpe().save(str(path / "tokenizer.json"))
    tok = load_tokenizer(path, LLAMA)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template(CHATS[0])
    with pytest.raises(ValueError, match="no chat template"):
        ByteTokenizer(512).apply_chat_template(CHATS[0])
    assert ByteTokenizer(512).encode("hi", add_special_tokens=False) == [104, 105]


def test_chat_completions_send_the_rendered_template_as_token_ids(tokenizers):
    """/v1/chat/completions: with a template the server sends transformers' rendering as token ids
    (BOS once); without one, the plain text template."""
    from serving.openai_protocol import ChatCompletionRequest

    ours, hf = tokenizers
    body = ChatCompletionRequest(model="m", messages=CHATS[1], max_tokens=4)
    proto = body.to_proto(ours)
    want = hf.apply_chat_template(CHATS[1], tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert proto.WhichOneof("prompt") == "token_ids" and list(proto.token_ids.ids) == list(want)
    assert list(proto.token_ids.ids).count(hf.bos_token_id) == 1
    assert body.to_proto(ByteTokenizer(LLAMA.vocab_size)).WhichOneof("prompt") == "text"
    assert body.to_proto().text.endswith("assistant:")
