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
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    completion: int = 0


class EngineObserver:
    """What the engine reports as it runs; server/metrics/ and the autoscaler listen."""

    def on_first_token(self, ttft_s: float) -> None: ...
    def on_token_gap(self, seconds: float) -> None: ...
    def on_finish(self, req: Request, status: str, completion_tokens: int) -> None: ...
    def on_step(self, running: int, waiting: int, kv_usage: float, tokens: int) -> None: ...
    def on_expert_tokens(self, layer: int, counts: np.ndarray) -> None: ...
