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
from experts.ffn import group_pairs
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
        num_experts = self.routing.count[l].shape[0]
        self.expert_counts[l] = torch.bincount(flat_e, minlength=num_experts)
        token = torch.arange(t).repeat_interleave(a)
        replica = token % self.routing.count[l][flat_e]
        owner = self.routing.holders[l][flat_e, replica]
        order, tokens, groups, sizes = group_pairs(topk_ids, topk_weights, owner, num_experts)
        x = hidden[tokens]                                   # one row per pair, grouped
        weights = topk_weights.reshape(-1)[order]
        out = torch.empty(x.shape, dtype=torch.float32)     # the workers' replies land here
        group_owner = torch.div(groups, num_experts, rounding_mode="floor")
        owners, groups_per_owner = torch.unique_consecutive(group_owner, return_counts=True)
        sent = []
        g0 = p0 = 0
        for w, ng in zip(owners.tolist(), groups_per_owner.tolist()):
            sizes_w = sizes[g0:g0 + ng]
            npairs = int(sizes_w.sum())
            link = self.links[w]
            try:
                link.send(l, x[p0:p0 + npairs], groups[g0:g0 + ng] % num_experts, sizes_w, weights[p0:p0 + npairs])
            except Exception:
                _drain(sent, l, out)
                raise
            sent.append((link, p0, npairs))
            g0 += ng
            p0 += npairs
        slowest = 0.0
        for i, (link, p0, npairs) in enumerate(sent):
            try:
                link.recv_into(l, out[p0:p0 + npairs])
            except Exception:
                _drain(sent[i + 1:], l, out)
                raise
            slowest = max(slowest, link.last_compute_s)
        # the critical path's worker compute; the rest of "experts" is routing and transport
        self.profile.add("expert_ffn_on_worker", slowest)
        combined = torch.zeros(hidden.shape, dtype=torch.float32).index_add_(0, tokens, out)
        return combined.to(hidden.dtype)


def _drain(sent: list, layer: int, out: torch.Tensor) -> None:
    """After a failed exchange, read and drop the replies the other links still owe, so that each
    stays in step for the retry of the step."""
    for link, p0, n in sent:
        try:
            link.recv_into(layer, out[p0:p0 + n])
        except Exception:
            pass
