"""Turning a row of logits into the next token: greedy, or temperature / top-k / top-p with an
optional per-request seed (the same seed gives the same tokens, whatever else is in the batch)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0               # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """One per request: holds the request's random generator so its stream is reproducible."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.gen: torch.Generator | None = None
        if not params.greedy:
            self.gen = torch.Generator()
            if params.seed is not None:
                self.gen.manual_seed(params.seed)
            else:
                self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (float32) -> token id."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        # shifted so the largest is 0 first: a tiny temperature (float32 allows 1e-45) then gives
        # -inf, not inf, and softmax stays finite instead of failing the whole batch's step on NaN
        logits = (logits - logits.max()) / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.gen))
