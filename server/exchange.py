"""The engine's expert backend over the data plane: route each (token, expert) pair to a worker
that holds the expert in the step's topology version, one exchange per MoE layer.

A replica choice is a pure function of the token's index in the step, so a hot expert's tokens are
spread over its replicas and the same batch always goes the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from experts.dataplane import WorkerLink
from experts.profile import NO_PROFILE, StepProfile


@dataclass(frozen=True)
class Routing:
    """log2phy of one topology version as tensors: for MoE layer l, expert e has `count[l][e]`
    holders, `holders[l][e, :count]` (indices into `workers`)."""
    version: int
    workers: tuple[str, ...]
    holders: tuple[torch.Tensor, ...]   # [L] of [E, R] long
    count: tuple[torch.Tensor, ...]     # [L] of [E] long

    @staticmethod
    def build(version: int, workers: Sequence[str], experts_of: Sequence[Sequence[Sequence[int]]],
              num_layers: int, num_experts: int) -> "Routing":
        """experts_of[w][l]: the logical experts worker w holds in MoE layer l."""
        holders, count = [], []
        for layer in range(num_layers):
            lists: list[list[int]] = [[] for _ in range(num_experts)]
            for w, per_layer in enumerate(experts_of):
                for e in per_layer[layer]:
                    lists[e].append(w)
            missing = [e for e, h in enumerate(lists) if not h]
            if missing:
                raise ValueError(f"topology v{version}: layer {layer} experts {missing} have no holder")
            width = max(len(h) for h in lists)
            table = torch.tensor([h + [h[0]] * (width - len(h)) for h in lists], dtype=torch.long)
            holders.append(table)
            count.append(torch.tensor([len(h) for h in lists], dtype=torch.long))
        return Routing(version, tuple(workers), tuple(holders), tuple(count))


class RemoteExperts:
    """ExpertBackend that sends each worker its share of a layer's pairs and sums the answers."""

    def __init__(self, routing: Routing, links: Mapping[str, WorkerLink], moe_index: Mapping[int, int],
                 hidden: int, profile: StepProfile = NO_PROFILE) -> None:
        self.profile = profile
        self.routing = routing
        self.links = [links[w] for w in routing.workers]
        self.moe_index = dict(moe_index)
        self.hidden = hidden
        self.expert_counts: dict[int, torch.Tensor] = {}   # MoE layer -> routed pairs per expert, this step

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        l = self.moe_index[layer]
        t, a = topk_ids.shape
        flat_e = topk_ids.reshape(-1)
        flat_w = topk_weights.reshape(-1)
        tok = torch.arange(t).repeat_interleave(a)
        count = self.routing.count[l]
        self.expert_counts[l] = torch.bincount(flat_e, minlength=count.shape[0])
        replica = tok % count[flat_e]
        owner = self.routing.holders[l][flat_e, replica]
        order = torch.argsort(owner, stable=True)
        owners, sizes = torch.unique_consecutive(owner[order], return_counts=True)
        sent = []
        start = 0
        for w, n in zip(owners.tolist(), sizes.tolist()):
            idx = order[start:start + n]
            start += n
            rows, local = torch.unique(tok[idx], return_inverse=True)
            link = self.links[w]
            link.send(l, hidden[rows], local, flat_e[idx], flat_w[idx])
            sent.append((link, rows))
        out = torch.zeros(t, self.hidden, dtype=torch.float32)
        slowest = 0.0
        for link, rows in sent:
            out.index_add_(0, rows, link.recv(l, rows.shape[0], self.hidden))
            slowest = max(slowest, link.last_compute_s)
        # the critical path's worker compute; the rest of "experts" is routing and transport
        self.profile.add("expert_ffn_on_worker", slowest)
        return out.to(hidden.dtype)
