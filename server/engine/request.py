"""A request as the engine sees it, what it streams back, and what the engine reports as it runs."""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import numpy as np

from server.engine.sampling import SamplingParams


@dataclass(frozen=True)
class Output:
    token_ids: list[int]
    text: str
    finish: str | None = None        # "length" | "stop" | "eos" | "error" | "cancelled" | "rejected" (queue full)
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    outputs: "queue.SimpleQueue[Output]" = field(default_factory=queue.SimpleQueue)
    # how its tokens are delivered: the first at once, then an output every `stream_interval` new
    # tokens, and the last with the finish. 1 streams each token; a non-streaming client asks for
    # its whole completion with max_tokens (one output after the first token, one at the end)
    stream_interval: int = 1
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    completion: int = 0
    # tokens (and their text) not delivered yet: appended to, so holding N tokens costs N, not N^2
    _held_ids: list[int] = field(default_factory=list, init=False, repr=False)
    _held_text: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")

    def deliver(self, token: int, text: str) -> Output | None:
        """One new token (not the last): the output now due for the stream, or None while it is held
        until `stream_interval` are due."""
        self._held_ids.append(token)
        self._held_text.append(text)
        if self.completion == 1 or len(self._held_ids) >= self.stream_interval:
            return self.take_held()
        return None

    def take_held(self) -> Output:
        """What `deliver` holds back (handed to the last output), and nothing held from then on."""
        held = Output(self._held_ids, "".join(self._held_text))
        self._held_ids, self._held_text = [], []
        return held


class EngineObserver:
    """What the engine reports as it runs; server/metrics/ and the autoscaler listen."""

    def on_first_token(self, ttft_s: float) -> None: ...
    def on_token_gap(self, seconds: float) -> None: ...
    def on_finish(self, req: Request, status: str, completion_tokens: int) -> None: ...
    def on_step(self, running: int, waiting: int, kv_usage: float, tokens: int) -> None: ...
    def on_expert_tokens(self, layer: int, counts: np.ndarray) -> None: ...
