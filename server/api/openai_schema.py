"""OpenAI's request and response bodies for /v1/completions and /v1/chat/completions: reading a
body into checked fields, and the JSON objects and stream chunks sent back.

Strict as OpenAI is: an unknown field is a 400 naming it, and a known one we cannot honour (n > 1,
logprobs, penalties, tools, ...) is a 400 naming it rather than silently ignored, since ignoring it
would change the answer the client expects. `top_k` and `ignore_eos` are accepted as vLLM accepts them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from server.api.requests import InvalidField, sampling_params
from server.engine.sampling import SamplingParams

FINISH = {"length": "length", "stop": "stop", "eos": "stop"}
# fields read, and fields accepted and ignored (they do not change the tokens)
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
           "ignore_eos", "n", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user"}
_COMPLETION = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                   "function_call", "response_format", "parallel_tool_calls", "metadata", "store", "service_tier"}
# field -> the values that ask for nothing we lack
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False), "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
}


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, not in JSON: `"max_tokens": true` is a wrong type
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidField(name, f"expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise InvalidField(name, f"expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", bool: "a boolean", str: "a string",
                        dict: "an object", list: "an array"}[k] for k in kinds)


@dataclass(frozen=True)
class Common:
    """What both endpoints share, checked; `max_tokens` None = as many as the context leaves."""
    model: str | None
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool

    def params(self, default_max_tokens: int) -> SamplingParams:
        mt = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return sampling_params(mt, self.temperature, self.top_p, self.top_k, self.seed, self.stop, self.ignore_eos)


def read_common(body: Any, allowed: set[str], max_tokens_default: int | None) -> Common:
    if not isinstance(body, dict):
        raise InvalidField("body", "expected a JSON object")
    for name in body:
        if name not in allowed:
            raise InvalidField(name, "unrecognized request argument")
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise InvalidField(name, f"{body[name]!r} is not supported by this server")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidField("stop", f"expected a string or an array of strings, got {body.get('stop')!r}")
    options = _get(body, "stream_options", dict, {})
    stream = _get(body, "stream", bool, False)
    if options and not stream:
        raise InvalidField("stream_options", "only allowed when stream is true")
    max_tokens = _get(body, "max_tokens", int, None)
    if "max_completion_tokens" in allowed:
        max_tokens = _get(body, "max_completion_tokens", int, max_tokens)
    common = Common(
        model=_get(body, "model", str, None), stream=stream,
        include_usage=bool(_get(options, "include_usage", bool, False)),
        max_tokens=max_tokens if max_tokens is not None else max_tokens_default,
        temperature=float(_get(body, "temperature", (int, float), 1.0)),   # OpenAI's default
        top_p=float(_get(body, "top_p", (int, float), 1.0)), top_k=_get(body, "top_k", int, 0),
        seed=_get(body, "seed", int, None), stop=tuple(stop), ignore_eos=_get(body, "ignore_eos", bool, False))
    common.params(1)   # every field's range checked now, before any tokenizing
    return common


def read_completion(body: Any) -> tuple[Common, str | list[int]]:
    """A /v1/completions body: its fields and its one prompt (text, or token ids)."""
    common = read_common(body, _COMPLETION, max_tokens_default=16)   # OpenAI's default for completions
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]   # a batch of one
    if isinstance(prompt, str):
        return common, prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return common, prompt
    raise InvalidField("prompt", "expected a string or an array of token ids (one prompt per request)")


def read_chat(body: Any) -> tuple[Common, list[dict[str, str]]]:
    """A /v1/chat/completions body: its fields and its messages, content flattened to text."""
    common = read_common(body, _CHAT, max_tokens_default=None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidField("messages", "expected a non-empty array of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidField(f"messages[{i}]", "expected an object with a string role")
        content = m.get("content")
        if isinstance(content, list):   # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidField(f"messages[{i}].content", "only text parts are supported")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidField(f"messages[{i}].content", "expected a string or an array of text parts")
        msg = {"role": m["role"], "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return common, out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, model: str, created: int, text: str, finish: str | None,
                      use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


def _chunk(rid: str, kind: str, model: str, created: int, choice: dict[str, Any] | None,
           use: dict[str, int] | None, with_usage: bool) -> dict[str, Any]:
    """One stream event of either endpoint; `choice` None = the closing usage event (no choices)."""
    body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                            "choices": [] if choice is None else [dict(index=0, logprobs=None, **choice)]}
    if with_usage:   # OpenAI: with include_usage every chunk carries usage, null but on the last
        body["usage"] = use
    return body


def completion_chunk(rid: str, model: str, created: int, text: str | None, finish: str | None,
                     use: dict[str, int] | None, with_usage: bool) -> dict[str, Any]:
    """One stream event; `text` None = the closing usage event (no choices)."""
    choice = None if text is None else {"text": text, "finish_reason": finish}
    return _chunk(rid, "text_completion", model, created, choice, use, with_usage)


def chat_object(rid: str, model: str, created: int, text: str, finish: str | None, use: dict[str, int] | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, str] | None, finish: str | None,
               use: dict[str, int] | None, with_usage: bool) -> dict[str, Any]:
    choice = None if delta is None else {"delta": delta, "finish_reason": finish}
    return _chunk(rid, "chat.completion.chunk", model, created, choice, use, with_usage)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def now() -> int:
    return int(time.time())
