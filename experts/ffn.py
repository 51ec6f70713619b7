"""Routed expert FFNs over the (token, expert) pairs one holder received.

A holder (a worker, or the in-process backend) gets the rows of the hidden states it needs and,
per pair, which row, which logical expert and the router weight. It returns, per row, the
weighted sum of its experts' outputs; the engine adds the holders' partial sums.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# (layer, expert) -> (gate_up [2I, D], down [D, I])
WeightLookup = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def run_experts(layer: int, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, lookup: WeightLookup) -> torch.Tensor:
    """x [N, D]; rows, expert_ids, weights [M] -> out [N, D] in float32.

    Partial sums stay float32 so that a bfloat16 model is not rounded once per holder: how the
    experts are spread over workers must not change the tokens."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    if rows.numel() == 0:
        return out
    order = torch.argsort(expert_ids, stable=True)
    rows, expert_ids, weights = rows[order], expert_ids[order], weights[order]
    uniq, counts = torch.unique_consecutive(expert_ids, return_counts=True)
    start = 0
    for e, n in zip(uniq.tolist(), counts.tolist()):
        r = rows[start:start + n]
        gate_up, down = lookup(layer, e)
        xi = x[r]
        gu = F.linear(xi, gate_up)
        inter = gate_up.shape[0] // 2
        y = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], down)
        out.index_add_(0, r, (y * weights[start:start + n, None].to(y.dtype)).float())
        start += n
    return out


class LocalExperts:
    """Every expert in this process: the reference backend (tests, and single-process runs)."""

    def __init__(self, lookup: WeightLookup) -> None:
        self.lookup = lookup

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        t, a = topk_ids.shape
        rows = torch.arange(t).repeat_interleave(a)
        out = run_experts(layer, hidden, rows, topk_ids.reshape(-1), topk_weights.reshape(-1), self.lookup)
        return out.to(hidden.dtype)
