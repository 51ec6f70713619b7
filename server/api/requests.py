"""From what a client sent to an engine request: one set of rules for every API.

The gRPC API (`grpc_service.py`) and the OpenAI-compatible HTTP API (`http_service.py`) both build
their sampling parameters and choose their prompt here, so a request one of them refuses the other
refuses too, in the same words. Each API only maps a refusal onto its own codes:

| refusal      | requests_total status | gRPC                 | HTTP |
| ------------ | --------------------- | -------------------- | ---- |
| ValueError   | invalid               | INVALID_ARGUMENT     | 400  |
| QueueFull    | rejected              | RESOURCE_EXHAUSTED   | 429  |
| IntakeClosed | rejected              | UNAVAILABLE          | 503  |
"""
from __future__ import annotations

import asyncio
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Protocol, Sequence

from server.engine.loop import IntakeClosed
from server.engine.request import Output
from server.engine.sampling import SamplingParams
from server.engine.scheduler import QueueFull

MAX_STOP_STRINGS = 16
MAX_SEED = 2**64 - 1      # the gRPC field is a uint64; HTTP takes the same range


class InvalidField(ValueError):
    """A request field out of range; `field` names it as the client spelled it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Refusal:
    """Why a request never reached the engine, as every API reports it."""
    status: str          # the elasticmoe_requests_total label: "invalid" | "rejected"
    kind: str            # "invalid" | "queue_full" | "unavailable"
    message: str
    field: str | None    # the request field at fault, when one is


def refusal_of(exc: Exception) -> Refusal | None:
    """The refusal an exception raised while building or submitting a request stands for; None
    for anything else (a bug of ours, which the API reports as an internal error)."""
    if isinstance(exc, InvalidField):
        return Refusal("invalid", "invalid", str(exc), exc.field)
    if isinstance(exc, ValueError):
        return Refusal("invalid", "invalid", str(exc), None)
    if isinstance(exc, QueueFull):
        return Refusal("rejected", "queue_full", f"queue full: {exc}", None)
    if isinstance(exc, IntakeClosed):
        return Refusal("rejected", "unavailable", str(exc) or "server shutting down", None)
    return None


def sampling_params(max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                    prefix: str = "") -> SamplingParams:
    """Checked sampling parameters; InvalidField naming `prefix + field` for anything out of range.
    `top_p` 0 means 1 (protobuf cannot tell an unset float from 0)."""
    def bad(field: str, message: str) -> InvalidField:
        return InvalidField(prefix + field, message)

    if max_tokens < 1:
        raise bad("max_tokens", f"must be >= 1, got {max_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise bad("temperature", f"must be a finite number >= 0, got {temperature}")
    if not 0.0 <= top_p <= 1.0:   # also rejects NaN
        raise bad("top_p", f"must be in [0, 1], got {top_p}")
    if top_k < 0:
        raise bad("top_k", f"must be >= 0, got {top_k}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad("seed", f"must be in [0, 2**64), got {seed}")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    if any(not s for s in stop):
        raise bad("stop", "must not contain an empty string")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p or 1.0, top_k=top_k,
                          seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)


def choose_prompt(text: str, token_ids: Sequence[int], text_field: str = "prompt",
                  ids_field: str = "prompt_token_ids") -> str | list[int]:
    """Exactly one of a text prompt and a token-id prompt: the text, or the ids as a list."""
    has_text, has_ids = bool(text), bool(token_ids)
    if has_text == has_ids:
        raise InvalidField(f"{text_field} / {ids_field}", "give exactly one of them"
                           + (" (both were set)" if has_text else " (neither was set, or it was empty)"))
    return text if has_text else list(token_ids)


def encode_prompt(tokenizer: "TextTokenizer", text: str) -> list[int]:
    """Token ids of a non-empty text prompt; ValueError naming `prompt` otherwise."""
    ids = tokenizer.encode(text).ids
    if not ids:
        raise InvalidField("prompt", "encodes to no tokens")
    return ids


class Encoding(Protocol):
    ids: list[int]


class TextTokenizer(Protocol):
    def encode(self, text: str) -> Encoding: ...


class LoopMailbox:
    """Every output the engine thread hands to one event loop, delivered in one wake-up per burst.

    The engine emits a token for each running request at the end of every step; waking the loop
    once per token (a self-pipe write each, and the loop thread taking the GIL from the engine
    thread as many times) cost the engine about 4% of its step at batch 32. A post that finds the
    mailbox empty schedules one drain; the posts after it ride along until the loop runs it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Output]] = []

    def post(self, queue: "asyncio.Queue[Output]", out: Output) -> None:
        with self._lock:
            self._pending.append((queue, out))
            if len(self._pending) > 1:
                return   # a drain is scheduled already and will take this one too
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass   # the loop is closed: the API stopped and nobody reads these streams any more

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for queue, out in batch:
            queue.put_nowait(out)


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox]" = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def mailbox(loop: asyncio.AbstractEventLoop) -> LoopMailbox:
    """The one mailbox of `loop`."""
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = LoopMailbox(loop)
        return box


class LoopOutputs:
    """A request's outputs as the engine thread puts them (it only ever calls `put`), delivered to
    the stream's coroutine on the API's event loop (gRPC's or HTTP's) through the loop's mailbox."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self._box = mailbox(loop)

    def put(self, out: Output) -> None:
        self._box.post(self.queue, out)
