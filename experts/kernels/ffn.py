"""Routed expert FFNs over the (token, expert) pairs one holder received.

The sender lays the pairs out grouped by expert: `x` holds one row of hidden state per pair, in
that order, and `expert_ids`/`counts` say which expert owns each run of rows. The holder returns
one output row per pair, already multiplied by its router weight; the engine adds each token's
rows. Grouped rows make each expert's input a contiguous slice: no gather, no sort on the holder.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# (layer, expert) -> (gate_up [2I, D], down [D, I])
WeightLookup = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def run_grouped(layer: int, x: torch.Tensor, expert_ids: list[int], counts: list[int], weights: torch.Tensor,
                lookup: WeightLookup) -> torch.Tensor:
    """x [M, D] grouped by expert; expert_ids, counts [G]; weights [M] -> weighted outputs [M, D], float32.

    Outputs stay float32 so that a bfloat16 model is not rounded once per holder: how the
    experts are spread over workers must not change the tokens."""
    out = torch.empty(x.shape, dtype=torch.float32)
    start = 0
    for e, n in zip(expert_ids, counts):
        gate_up, down = lookup(layer, e)
        xi = x[start:start + n]
        gu = F.linear(xi, gate_up)
        inter = gate_up.shape[0] // 2
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        if h.dtype == torch.float32:
            torch.mm(h, down.t(), out=out[start:start + n])
        else:
            out[start:start + n] = F.linear(h, down)
        start += n
    assert start == x.shape[0], (start, x.shape)
    return out.mul_(weights.unsqueeze(1))


def group_pairs(topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order a layer's (token, expert) pairs by expert.

    Returns (order [M] into the flat pairs, token of each ordered pair [M], the expert of each
    group [G], pairs per group [G])."""
    a = topk_ids.shape[1]
    flat_e = topk_ids.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    groups, counts = torch.unique_consecutive(flat_e[order], return_counts=True)
    tokens = torch.div(order, a, rounding_mode="floor")
    return order, tokens, groups, counts

