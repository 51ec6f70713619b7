"""A checkpoint's chat template, rendered with jinja2 the way transformers' `apply_chat_template`
renders it (same sandbox, options, filters and globals; the tokenizer's special tokens as variables),
without importing transformers.

Where it lives: `chat_template` in `tokenizer_config.json` (a string, or a list of named templates
of which `default` is used), or `chat_template.jinja` beside it (what transformers 5 saves).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# the tokenizer_config.json keys transformers passes to a template (its special tokens map)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses the tag only to
    mark assistant tokens for training masks)."""
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # as transformers: jinja's own tojson escapes HTML characters, which templates do not expect
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the checkpoint's chat template does not compile: {exc}") from None
        self.special_tokens = special_tokens

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text; ValueError with the template's own message when it refuses the messages
        (templates call raise_exception, e.g. for roles out of order)."""
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ValueError(f"messages: the chat template refused them: {exc}") from None


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as its text, or as an AddedToken object
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none."""
    d = Path(model_dir)
    cfg_path = d / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file():
        loaded = json.loads(cfg_path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")
        cfg = loaded
    source = cfg.get("chat_template")
    if isinstance(source, list):   # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_file = d / "chat_template.jinja"
    if not isinstance(source, str) and jinja_file.is_file():
        source = jinja_file.read_text()
    if not isinstance(source, str) or not source:
        return None
    special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(cfg.get(name))) is not None}
    return ChatTemplate(source, special)
