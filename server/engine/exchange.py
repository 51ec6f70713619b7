"""The engine's expert backend over the data plane: route each (token, expert) pair to a worker
that holds the expert in the step's topology version, one exchange per MoE layer.

A replica choice is a pure function of the token's index in the step, so a hot expert's tokens are
spread over its replicas and the same batch always goes the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from experts.wire.dataplane import WorkerLink
from experts.model.profile import NO_PROFILE, StepProfile


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

    def owners(self, layer: int, ids: np.ndarray, top_k: int) -> np.ndarray:
        """ids [T*A] experts of MoE layer ``layer`` chosen per pair, token-major -> [T*A] index into
        ``workers`` of the holder each pair goes to: replica (token index mod holders), so a hot
        expert's tokens alternate over its replicas and the same batch always goes the same way."""
        holders, count = self.holders[layer].numpy(), self.count[layer].numpy()
        token = np.arange(ids.shape[0]) // top_k
        return holders[ids, token % count[ids]]


class RemoteExperts:
    """The ExpertBackend (experts/model/backend.py) that sends each worker its share of a layer's
    pairs and sums the answers."""

    def __init__(self, routing: Routing, links: Mapping[str, WorkerLink], moe_index: Mapping[int, int],
                 hidden: int, profile: StepProfile = NO_PROFILE) -> None:
        self.profile = profile
        self.routing = routing
        self.links = [links[w] for w in routing.workers]
        self.moe_index = dict(moe_index)
        self.hidden = hidden
        self.expert_counts: dict[int, np.ndarray] = {}     # MoE layer -> routed pairs per expert, this step

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(layer, hidden, topk_ids, topk_weights))

    def start(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> "_Exchange":
        """Send each worker its pairs of this layer; the workers compute while the caller goes on."""
        # The routing below runs on every layer of every step over a few dozen pairs: numpy's
        # per-call cost is a fraction of torch's at these sizes, and the arrays are views.
        l = self.moe_index[layer]
        a = topk_ids.shape[1]
        num_experts = self.routing.count[l].shape[0]
        ids = topk_ids.numpy().reshape(-1)
        routed = np.bincount(ids, minlength=num_experts)   # summed over the step's micro-batches
        self.expert_counts[l] = self.expert_counts[l] + routed if l in self.expert_counts else routed
        owner = self.routing.owners(l, ids, a)
        key = owner * num_experts + ids
        order = np.argsort(key, kind="stable")            # pairs grouped by (worker, expert)
        sorted_key = key[order]
        starts = np.flatnonzero(np.concatenate(([True], sorted_key[1:] != sorted_key[:-1])))
        sizes = np.diff(np.append(starts, len(sorted_key)))
        groups = sorted_key[starts]
        tokens = torch.from_numpy(order // a)
        x = hidden[tokens]                                # one row per pair, grouped
        weights = topk_weights.float().numpy().reshape(-1)[order]
        out = torch.empty(x.shape, dtype=torch.float32)  # the workers' replies land here
        group_owner = groups // num_experts
        owner_starts = np.flatnonzero(np.concatenate(([True], group_owner[1:] != group_owner[:-1])))
        owner_ends = np.append(owner_starts[1:], len(groups))
        sent = []
        for g0, g1 in zip(owner_starts.tolist(), owner_ends.tolist()):
            p0 = int(starts[g0])
            p1 = int(starts[g1]) if g1 < len(starts) else len(sorted_key)
            link = self.links[int(group_owner[g0])]
            try:
                link.send(l, x[p0:p1], groups[g0:g1] % num_experts, sizes[g0:g1], weights[p0:p1])
            except Exception:
                _drain(sent, l, out)
                raise
            sent.append((link, p0, p1 - p0))
        return _Exchange(l, sent, out, tokens, hidden.shape, hidden.dtype)

    def finish(self, ex: "_Exchange") -> torch.Tensor:
        """Receive the workers' replies of one started exchange and add up each token's rows."""
        slowest = 0.0
        for i, (link, p0, npairs) in enumerate(ex.sent):
            try:
                link.recv_into(ex.layer, ex.out[p0:p0 + npairs])
            except Exception:
                _drain(ex.sent[i + 1:], ex.layer, ex.out)
                raise
            slowest = max(slowest, link.last_compute_s)
        # the critical path's worker compute; the rest of "experts" is routing and transport
        self.profile.add("expert_ffn_on_worker", slowest)
        combined = torch.zeros(ex.shape, dtype=torch.float32).index_add_(0, ex.tokens, ex.out)
        return combined.to(ex.dtype)

    def abandon(self, ex: "_Exchange") -> None:
        """A started exchange that will not be finished: read and drop the replies it is owed."""
        _drain(ex.sent, ex.layer, ex.out)

    def take_expert_counts(self) -> dict[int, np.ndarray]:
        """Routed pairs per expert of each MoE layer since the last call (ExpertBackend)."""
        counts, self.expert_counts = self.expert_counts, {}
        return counts


@dataclass
class _Exchange:
    """One started exchange: which links owe replies, and where they land."""
    layer: int
    sent: list
    out: torch.Tensor
    tokens: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


def _drain(sent: list, layer: int, out: torch.Tensor) -> None:
    """After a failed exchange, read and drop the replies the other links still owe, so that each
    stays in step for the retry of the step."""
    for link, p0, n in sent:
        try:
            link.recv_into(layer, out[p0:p0 + n])
        except Exception:
            pass
