"""Placement planner: which worker holds which logical expert, and what must move to get there.

Step 1 ("plan") of a change of topology in DESIGN.md: pure and deterministic, no torch, ray or I/O.
Shapes: L layers, E experts per layer, W workers, S slots per worker per layer.

    plan_placement = for each layer: replicate -> place_layer (pack, keep, assign, ...: pack.py)
                     [-> share_on_nodes: each worker also holds what its node holds]
                     then diff: old placement vs new -> moves (with their sources) and releases
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from experts.placement.pack import HOT_FACTOR, SLACK, Affinity, place_layer, replicate
from experts.placement.plan import Move, Placement, Plan
from experts.placement.share import share_on_nodes

__all__ = ["HOT_FACTOR", "SLACK", "Move", "Placement", "Plan", "diff", "plan_placement"]


def plan_placement(current: Placement | None, workers: Sequence[str], nodes: Mapping[str, str],
                   num_layers: int, num_experts: int, slots_per_worker: int,
                   load: Sequence[Sequence[float]] | None = None, replicate_hot: bool = False,
                   redundant: int = 0, share_node: bool = False) -> Plan:
    """Place L x E logical experts on the target workers, S slots each per layer; list the moves.

    current: the placement serving now, or None at start-up (everything is read from disk).
    workers: [W] target ids; current workers absent here are leaving (and may still be sources).
    nodes: worker id -> node id, for every current and target worker.
    load: [L][E] routed-token counts; None, or a layer without load, counts as uniform.
    replicate_hot: spare slots (W*S > E) may hold extra replicas of hot experts.
    redundant: this many spare slots per layer hold replicas of the hottest experts whatever their
    load (as many as the spare slots and W allow).
    share_node: each worker also holds every expert another worker of its node holds, in every
    layer where its S slots allow (share.py): on one node a replica is a remap (no byte copied,
    no memory: the workers map the same segment), and the engine balances each layer over them.
    Returns a Plan whose placement is [W][L] -> experts, each layer within pack.py's band.
    Raises ValueError, quoting the bad value, for impossible or malformed input.
    """
    targets, S = tuple(workers), slots_per_worker
    old = current if current is not None else Placement((), ())
    _validate(old, targets, nodes, num_layers, num_experts, S, load)
    if isinstance(redundant, bool) or not isinstance(redundant, int) or redundant < 0:
        raise ValueError(f"redundant must be an int >= 0, got {redundant!r}")
    per_layer = []  # [L][W] -> experts
    for l in range(num_layers):
        items = replicate(load[l] if load is not None else None, num_experts, len(targets), S, replicate_hot,
                          redundant)
        affinity = Affinity(
            held=tuple(frozenset(old.held_by(w)[l]) if w in old.workers else frozenset() for w in targets),
            node=tuple(nodes[w] for w in targets),
            near={e: frozenset(nodes[old.workers[i]] for i in ix) for e, ix in old.log2phy(l).items()})
        per_layer.append(place_layer(items, affinity))
    if share_node:
        per_layer = [share_on_nodes(bins, tuple(nodes[w] for w in targets), S) for bins in per_layer]
    new = Placement(targets, tuple(tuple(tuple(x[w]) for x in per_layer) for w in range(len(targets))))
    moves, releases = diff(old, new, nodes)
    return Plan(new, moves, releases)


def diff(old: Placement, new: Placement, nodes: Mapping[str, str]
         ) -> tuple[tuple[Move, ...], tuple[tuple[str, int, int], ...]]:
    """[W_old][L] and [W_new][L] placements -> (moves, releases).

    moves: one per (layer, expert) a worker holds in ``new`` but not in ``old``, by layer, then
    destination in worker order, then expert. Its source is a current holder on the destination's
    node (a remap copies nothing) if any, else any current holder; among those the one asked for
    the fewest moves so far (ties: worker order); with no live copy, a worker of the same node
    that reads it from disk in this plan (its move comes first: the caller runs such remaps after
    the loads), else None (disk): a node reads each expert from disk once.
    releases: (worker, layer, expert) held in ``old`` and not in ``new``."""
    sends: Counter[str] = Counter()
    moves = []
    loading: dict[tuple[str, int, int], str] = {}   # (node, layer, expert) -> the worker reading it from disk
    before, after = dict(zip(old.workers, old.experts)), dict(zip(new.workers, new.experts))
    for l in range(new.num_layers):
        holders = old.log2phy(l)
        for dst, layers in zip(new.workers, new.experts):
            for e in (e for e in layers[l] if e not in (before[dst][l] if dst in before else ())):
                srcs = [old.workers[i] for i in holders.get(e, ())]
                same = [s for s in srcs if nodes[s] == nodes[dst]]
                src = min(same or srcs, key=lambda s: sends[s], default=None)
                if src is None:
                    src = loading.get((nodes[dst], l, e))
                    if src is None:
                        loading[(nodes[dst], l, e)] = dst
                if src is not None:
                    sends[src] += 1
                moves.append(Move(l, e, dst, src, src is not None and nodes[src] == nodes[dst]))
    releases = tuple((w, l, e) for w, layers in zip(old.workers, old.experts) for l, es in enumerate(layers)
                     for e in es if w not in after or e not in after[w][l])
    return tuple(moves), releases


def _validate(old: Placement, targets: tuple[str, ...], nodes: Mapping[str, str], L: int, E: int,
              S: int, load: Sequence[Sequence[float]] | None) -> None:
    if L < 1 or E < 1 or S < 1:
        raise ValueError(f"num_layers, num_experts, slots_per_worker must be >= 1, got {L}, {E}, {S}")
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"workers must be distinct ids, at least one, got {list(targets)}")
    if len(targets) * S < E:
        raise ValueError(f"{len(targets)} workers x {S} slots cannot hold {E} experts per layer")
    if missing := [w for w in (*targets, *old.workers) if w not in nodes]:
        raise ValueError(f"workers {missing} missing from nodes")
    if old.workers and (old.num_layers != L or old.num_experts > E):
        raise ValueError(f"current placement has {old.num_layers} layers and expert ids up to "
                         f"{old.num_experts - 1}; expected {L} layers of {E} experts")
    if load is not None and (len(load) != L or any(len(row) != E for row in load)):
        raise ValueError(f"load must be [L={L}][E={E}], got row lengths {[len(r) for r in load]}")
    for l, e, x in ((l, e, x) for l, row in enumerate(load if load is not None else ()) for e, x in enumerate(row)):
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"load[{l}][{e}] = {x}: must be finite and >= 0")
