"""The engine's expert backend over the data plane: route each (token, expert) pair to a worker
that holds the expert in the step's topology version, one exchange per MoE layer.

A replica choice is a pure function of the layer's routed experts (server/engine/replicas.py): the
layer's groups balanced over their holders, a hot expert's tokens split over its replicas, and the
same batch always goes the same way.

With `lead` (node-shared experts), a node's workers are one team: each expert is computed by the
first of its holders on each node, so one worker per node computes (with the node's CPUs) and its
node-mates stand by, mapped, for a reroute. On 2 cores this beat two workers of one thread each,
each layer split between them (one wake-up chain instead of two): batch 32 1001/1017 vs 912/906
tok/s, batch 8 416/442 vs 379/419 (A/B, 2 rounds, fp32).
Every request says how many processes of its node are busy with that layer (its `team`): the
workers it was sent to there, and the engine itself when it spins through a small exchange on
that node (experts/wire/ring.py); they share the node's CPUs (experts/kernels/threads.py).
Measured on 2 cores, 2 workers, fp32 (A/B, 2 rounds): batch 1 141.9/146.1 tok/s with the small
exchanges' worker on 1 thread against 130.2/131.2 on both cores beside the spinning engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from experts.model.backend import WorkerLost
from experts.wire.dataplane import ExchangeLink
from experts.wire.ring import SMALL_PAIRS
from experts.model.profile import NO_PROFILE, StepProfile
from server.engine.replicas import assign


@dataclass(frozen=True)
class Routing:
    """log2phy of one topology version as tensors: for MoE layer l, expert e has `count[l][e]`
    holders, `holders[l][e, :count]` (indices into `workers`)."""
    version: int
    workers: tuple[str, ...]
    holders: tuple[torch.Tensor, ...]   # [L] of [E, R] long
    count: tuple[torch.Tensor, ...]     # [L] of [E] long
    node: np.ndarray                    # [W] the node (an index) each worker runs on
    serving: frozenset[int]             # the workers some expert's pairs can go to (the rest stand by)

    @staticmethod
    def build(version: int, workers: Sequence[str], experts_of: Sequence[Sequence[Sequence[int]]],
              num_layers: int, num_experts: int, nodes: Sequence[str] | None = None,
              lead: bool = False) -> "Routing":
        """experts_of[w][l]: the logical experts worker w holds in MoE layer l. nodes[w]: worker w's
        node (None: all on one). lead: only the first holder of an expert on each node serves it."""
        node_ids = list(nodes) if nodes is not None else [""] * len(workers)
        if len(node_ids) != len(workers):
            raise ValueError(f"topology v{version}: {len(node_ids)} nodes for {len(workers)} workers")
        node = np.unique(node_ids, return_inverse=True)[1].astype(np.int64)
        holders, count = [], []
        serving: set[int] = set()
        for layer in range(num_layers):
            lists: list[list[int]] = [[] for _ in range(num_experts)]
            for w, per_layer in enumerate(experts_of):
                for e in per_layer[layer]:
                    if lead and any(node[h] == node[w] for h in lists[e]):
                        continue   # a node-mate earlier in worker order serves it
                    lists[e].append(w)
            serving.update(w for h in lists for w in h)
            missing = [e for e, h in enumerate(lists) if not h]
            if missing:
                raise ValueError(f"topology v{version}: layer {layer} experts {missing} have no holder")
            width = max(len(h) for h in lists)
            table = torch.tensor([h + [h[0]] * (width - len(h)) for h in lists], dtype=torch.long)
            holders.append(table)
            count.append(torch.tensor([len(h) for h in lists], dtype=torch.long))
        return Routing(version, tuple(workers), tuple(holders), tuple(count), node, frozenset(serving))

    def owners(self, layer: int, ids: np.ndarray, top_k: int, routed: np.ndarray | None = None) -> np.ndarray:
        """ids [T*A] experts of MoE layer ``layer`` chosen per pair, token-major -> [T*A] index into
        ``workers`` of the holder each pair goes to, the layer's work balanced over the replicas
        (server/engine/replicas.py); the same batch always goes the same way. `routed`: pairs per
        expert in `ids`, if counted already."""
        return assign(self.holders[layer].numpy(), self.count[layer].numpy(), ids, top_k, len(self.workers), routed)


class RemoteExperts:
    """The ExpertBackend (experts/model/backend.py) that sends each worker its share of a layer's
    pairs and sums the answers."""

    def __init__(self, routing: Routing, links: Mapping[str, ExchangeLink], moe_index: Mapping[int, int],
                 hidden: int, profile: StepProfile = NO_PROFILE) -> None:
        self.profile = profile
        self.routing = routing
        self.links = [links[w] for w in routing.workers]
        # 1 for a worker on the engine's node (its ring): the engine spins there through a small exchange
        self._beside_engine = np.array([link.kind == "ring" for link in self.links], dtype=np.int64)
        # held experts, sent no work: node-mates standing by for their node's lead
        self.standby = [self.links[w] for w in range(len(self.links)) if w not in routing.serving]
        self.moe_index = dict(moe_index)
        self.hidden = hidden
        self.expert_counts: dict[int, np.ndarray] = {}     # MoE layer -> routed pairs per expert, this step

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(layer, hidden, topk_ids, topk_weights))

    def start(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> "_Exchange":
        """Send each worker its pairs of this layer; the workers compute while the caller goes on."""
        # This runs on every layer of every step over a few dozen pairs: numpy's per-call cost is
        # a fraction of torch's at these sizes, the arrays are views, and no torch op here may
        # start a parallel region (on a loaded machine one costs more than the whole exchange).
        l = self.moe_index[layer]
        t, a = topk_ids.shape
        num_experts = self.routing.count[l].shape[0]
        ids = topk_ids.numpy().reshape(-1)
        routed = np.bincount(ids, minlength=num_experts)   # summed over the step's micro-batches
        self.expert_counts[l] = self.expert_counts[l] + routed if l in self.expert_counts else routed
        key = self.routing.owners(l, ids, a, routed) * num_experts + ids
        order = np.argsort(key, kind="stable")            # pairs grouped by (worker, expert)
        sorted_key = key[order]
        starts = _run_starts(sorted_key)
        pair_starts = starts.tolist() + [len(sorted_key)]
        sizes = np.subtract(pair_starts[1:], pair_starts[:-1])
        groups = sorted_key[starts]
        rows = torch.from_numpy(order // a)   # the hidden row of each pair, grouped: gathered by the link
        weights = topk_weights.numpy().reshape(-1)[order] if topk_weights.dtype == torch.float32 \
            else topk_weights.float().numpy().reshape(-1)[order]
        group_owner = groups // num_experts
        owner_starts = _run_starts(group_owner)
        busy = group_owner[owner_starts]
        busy_node = self.routing.node[busy]
        team = np.bincount(busy_node)[busy_node]   # busy workers on each one's node
        owner_pairs = np.diff(np.append(starts[owner_starts], len(sorted_key)))
        team = (team + self._beside_engine[busy] * (owner_pairs <= SMALL_PAIRS)).tolist()
        owner_starts = owner_starts.tolist()
        sent = []
        for i, (g0, g1) in enumerate(zip(owner_starts, owner_starts[1:] + [len(groups)])):
            p0, p1 = pair_starts[g0], pair_starts[g1]
            link = self.links[int(group_owner[g0])]
            try:
                link.send_rows(l, hidden, rows[p0:p1], groups[g0:g1] % num_experts, sizes[g0:g1], weights[p0:p1],
                               team[i])
            except Exception:
                _drain(sent, l, hidden.shape[1])
                raise
            sent.append((link, p0, p1 - p0))
        return _Exchange(l, sent, torch.from_numpy(order), t, a, hidden.shape[1], hidden.dtype)

    def finish(self, ex: "_Exchange") -> torch.Tensor:
        """Receive the workers' replies of one started exchange and add up each token's rows."""
        slowest = 0.0
        # each reply's rows go straight back to (token, choice) order (from a ring: out of its
        # slot, with no copy before), then each token's top-k rows are summed in choice order: the
        # sum's order is the router's, never the placement's, so how experts are spread over
        # workers cannot change a bit of it (and no scatter-add runs: a row copy and a small sum)
        pairs = torch.empty((ex.tokens * ex.top_k, ex.width), dtype=torch.float32)
        for i, (link, p0, npairs) in enumerate(ex.sent):
            try:
                link.recv_scatter(ex.layer, pairs, ex.order[p0:p0 + npairs])
            except Exception:
                _drain(ex.sent[i + 1:], ex.layer, ex.width)
                raise
            slowest = max(slowest, link.last_compute_s)
        # the critical path's worker compute; the rest of "experts" is routing and transport
        self.profile.add("expert_ffn_on_worker", slowest)
        return pairs.view(ex.tokens, ex.top_k, -1).sum(dim=1).to(ex.dtype)

    def abandon(self, ex: "_Exchange") -> None:
        """A started exchange that will not be finished: read and drop the replies it is owed."""
        _drain(ex.sent, ex.layer, ex.width)

    def check_standby(self) -> None:
        """WorkerLost for the first standing-by worker known gone (a few syscalls each)."""
        for link in self.standby:
            if not link.alive():
                raise WorkerLost(link.worker_id, "standing by: its link closed or its process exited")

    def take_expert_counts(self) -> dict[int, np.ndarray]:
        """Routed pairs per expert of each MoE layer since the last call (ExpertBackend)."""
        counts, self.expert_counts = self.expert_counts, {}
        return counts


@dataclass
class _Exchange:
    """One started exchange: which links owe replies, where they land, and the pairs' grouping."""
    layer: int
    sent: list              # (link, first pair, pairs) of each request, pairs grouped by (worker, expert)
    order: torch.Tensor     # [M] int64: grouped position -> flat (token, choice) index
    tokens: int
    top_k: int
    width: int              # D
    dtype: torch.dtype


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array."""
    change = np.empty(len(sorted_values), dtype=bool)
    change[:1] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


def _drain(sent: list, layer: int, width: int) -> None:
    """After a failed exchange, read and drop the replies the other links still owe, so that each
    stays in step for the retry of the step."""
    for link, _, n in sent:
        try:
            link.recv_into(layer, torch.empty((n, width), dtype=torch.float32))
        except Exception:
            pass
