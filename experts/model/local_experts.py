"""Every routed expert in this process: the reference expert backend (tests, single-process runs).

It keeps the backend contract (experts/model/backend.py) with nothing in flight: `start` computes
the layer at once with the reference kernel (`run_grouped`), `finish` hands the result back.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from experts.kernels.ffn import WeightLookup, group_pairs, run_grouped
from experts.model.profile import NO_PROFILE, StepProfile


class LocalExperts:
    """`lookup(moe_layer, expert)` gives an expert's weights; `moe_index` maps a decoder layer to
    its MoE layer index (ModelSpec.moe_index)."""

    def __init__(self, lookup: WeightLookup, moe_index: Mapping[int, int], num_experts: int) -> None:
        self.lookup = lookup
        self.moe_index = dict(moe_index)
        self.num_experts = num_experts
        self.profile: StepProfile = NO_PROFILE
        self._counts: dict[int, np.ndarray] = {}

    def start(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
        moe = self.moe_index[layer]
        routed = np.bincount(topk_ids.reshape(-1).numpy(), minlength=self.num_experts)
        self._counts[moe] = self._counts.get(moe, 0) + routed
        order, tokens, experts, counts = group_pairs(topk_ids)
        pairs = run_grouped(moe, hidden[tokens], experts.tolist(), counts.tolist(),
                            topk_weights.reshape(-1)[order].float(), self.lookup)
        out = torch.zeros(hidden.shape, dtype=torch.float32).index_add_(0, tokens, pairs)
        return out.to(hidden.dtype)

    def finish(self, handle: object) -> torch.Tensor:
        assert isinstance(handle, torch.Tensor), type(handle)
        return handle

    def abandon(self, handle: object) -> None:
        pass   # computed already: nothing is owed

    def check_standby(self) -> None:
        pass   # every expert is in this process: no worker stands by

    def take_expert_counts(self) -> dict[int, np.ndarray]:
        counts, self._counts = self._counts, {}
        return counts
