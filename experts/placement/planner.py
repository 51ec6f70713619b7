"""Placement planner: which worker holds which logical expert, and what must move to get there.

Step 1 ("plan") of a change of topology in DESIGN.md: pure and deterministic, no torch, ray or I/O.
Shapes: L layers, E experts per layer, W workers, S slots per worker per layer.

Each layer on its own: with ``replicate_hot``, spare slots first go to extra replicas of hot
experts, whose load splits evenly over them; each replica is an *item*. Let mean = total load / W,
a = the largest load of one item, B = the largest worker load of a reference placed from scratch
(greedy largest-first, or round-robin dealing, which provably stays within mean +- a). Bound:
    mean - a  <=  every worker's load  <=  limit = min(B + SLACK * a, mean + a)
and, within it, few moves: workers keep what they hold, shedding few items to get under the limit
(one where one is enough); the rest goes largest-first to the least-loaded worker with a free slot
(preferring the node of a live copy); single moves or swaps fix what is still over, and a worker far
below the mean takes items from the most-loaded. If stuck: all items afresh, each preferring its
current holders; then the reference. A placement within the bound is kept as is, so re-planning with
unchanged workers and load moves nothing; SLACK < 1 keeps uniform load exact (<= ceil(E/W) experts).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HOT_FACTOR = 2.0  # an expert is hot while its load per replica exceeds this x the layer's mean expert load
SLACK = 0.25  # load tolerated above the reference, in largest items, before experts move (less churn)
_EPS = 1e-9  # relative tolerance on float load sums


@dataclass(frozen=True)
class Placement:
    """phy2log: for each worker id, for each MoE layer, the logical experts it holds (sorted tuple).

    workers: [W] worker ids, in order. experts: [W][L] -> sorted logical expert ids held by worker w
    in layer l (lists are accepted and normalised to sorted tuples). num_layers (L) and num_experts
    (1 + the largest expert id held; a valid placement holds every expert) are derived properties.
    """

    workers: tuple[str, ...]
    experts: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        workers = tuple(self.workers)
        experts = tuple(tuple(tuple(sorted(es)) for es in layers) for layers in self.experts)
        if len(set(workers)) != len(workers) or len(experts) != len(workers) or len({len(x) for x in experts}) > 1:
            raise ValueError(f"need distinct workers, each with experts for the same number of layers: "
                             f"{list(workers)}, layers {[len(x) for x in experts]}")
        for w, l, es in ((w, l, es) for w, ls in zip(workers, experts) for l, es in enumerate(ls)):
            if len(set(es)) != len(es) or (es and es[0] < 0):
                raise ValueError(f"worker {w!r} layer {l} holds {list(es)}: ids must be distinct, >= 0")
        object.__setattr__(self, "workers", workers)
        object.__setattr__(self, "experts", experts)

    @property
    def num_layers(self) -> int:
        return len(self.experts[0]) if self.experts else 0

    @property
    def num_experts(self) -> int:
        return 1 + max((e for layers in self.experts for es in layers for e in es), default=-1)

    def log2phy(self, layer: int) -> dict[int, tuple[int, ...]]:
        """expert -> indices into ``workers`` holding it, in worker order; held experts only."""
        out: dict[int, tuple[int, ...]] = {}
        for w, layers in enumerate(self.experts):
            for e in layers[layer]:
                out[e] = out.get(e, ()) + (w,)
        return dict(sorted(out.items()))

    def holders(self, layer: int, expert: int) -> tuple[str, ...]:
        """Ids of the workers holding ``expert`` in ``layer``, in worker order."""
        return tuple(w for w, layers in zip(self.workers, self.experts) if expert in layers[layer])

    def held_by(self, worker: str) -> tuple[tuple[int, ...], ...]:
        """[L] -> sorted experts held by ``worker``."""
        if worker not in self.workers:
            raise ValueError(f"unknown worker {worker!r}; workers are {list(self.workers)}")
        return self.experts[self.workers.index(worker)]


@dataclass(frozen=True)
class Move:
    """One slot to fill before commit: logical expert (layer, expert) arrives at ``dst``."""

    layer: int
    expert: int
    dst: str  # worker receiving a copy
    src: str | None  # a current holder; None = read from the checkpoint (no live copy exists)
    same_node: bool  # src and dst on one node -> zero-copy remap; False when src is None


@dataclass(frozen=True)
class Plan:
    """The new placement, the moves that must arrive before commit, the slots freed after it."""

    placement: Placement
    moves: tuple[Move, ...]  # by layer, then dst in worker order, then expert
    releases: tuple[tuple[str, int, int], ...]  # (worker, layer, expert) held now, not in the new placement

    def moved_experts(self) -> int:
        """Slots filled by the change, over all layers (one per move)."""
        return len(self.moves)


def plan_placement(current: Placement | None, workers: Sequence[str], nodes: Mapping[str, str],
                   num_layers: int, num_experts: int, slots_per_worker: int,
                   load: Sequence[Sequence[float]] | None = None, replicate_hot: bool = False) -> Plan:
    """Place L x E logical experts on the target workers, S slots each per layer; list the moves.

    current: the placement serving now, or None at start-up (everything is read from disk).
    workers: [W] target ids; current workers absent here are leaving (and may still be sources).
    nodes: worker id -> node id, for every current and target worker.
    load: [L][E] routed-token counts; None, or a layer without load, counts as uniform.
    replicate_hot: spare slots (W*S > E) may hold extra replicas of hot experts.
    Returns a Plan whose placement is [W][L] -> experts, within the module docstring's bound.
    Raises ValueError, quoting the bad value, for impossible or malformed input.
    """
    targets, S = tuple(workers), slots_per_worker
    old = current if current is not None else Placement((), ())
    _validate(old, targets, nodes, num_layers, num_experts, S, load)
    node = [nodes[w] for w in targets]
    per_layer = []  # [L][W] -> experts
    for l in range(num_layers):
        p, counts = _items(load[l] if load is not None else None, num_experts, len(targets), S, replicate_hot)
        held = [set(old.held_by(w)[l]) if w in old.workers else set() for w in targets]
        near = {e: {nodes[old.workers[i]] for i in ix} for e, ix in old.log2phy(l).items()}
        per_layer.append(_place_layer(p, counts, held, node, near, S))
    new = Placement(targets, tuple(tuple(tuple(x[w]) for x in per_layer) for w in range(len(targets))))
    return Plan(new, _moves(old, new, nodes), _releases(old, new))


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


def _items(row: Sequence[float] | None, E: int, W: int, S: int, replicate_hot: bool) -> tuple[list[float], list[int]]:
    """[E] loads -> ([E] load of one replica, [E] replica count)."""
    a = [float(x) for x in row] if row is not None and math.fsum(row) > 0 else [1.0] * E
    counts, hot = [1] * E, HOT_FACTOR * math.fsum(a) / E
    for _ in range(W * S - E if replicate_hot else 0):
        # the hottest per replica, among experts not yet on every worker (replicas never share one)
        e = max((e for e in range(E) if counts[e] < W), key=lambda e: (a[e] / counts[e], -e), default=None)
        if e is None or a[e] / counts[e] <= hot:
            break
        counts[e] += 1
    return [a[e] / counts[e] for e in range(E)], counts


def _load(experts: Sequence[int], p: Sequence[float]) -> float:
    return math.fsum(p[e] for e in experts)  # exact, so independent of the order of experts


def _place_layer(p: list[float], counts: list[int], held: list[set[int]], node: list[str],
                 near: dict[int, set[str]], S: int) -> list[list[int]]:
    """[W] experts held now (empty for new workers) -> [W] sorted experts; near: expert -> nodes holding it."""
    W = len(held)
    items = sorted((e for e in range(len(p)) for _ in range(counts[e])), key=lambda e: (-p[e], e))
    mean, a = _load(items, p) / W, max(p)
    tol = _EPS * (mean + a)
    ref = _repair(p, counts, [set()] * W, node, {}, S, math.inf, -math.inf, keep=False)  # greedy
    if ref is None or not all(mean - a - tol <= _load(b, p) <= mean + a + tol for b in ref):
        # Dealing: bin b gets items b, b+W, ...; each is no larger than any item of the round
        # before and no smaller than any of the round after, so every bin is within mean +- a.
        # Replicas of an expert are consecutive items, so they land on distinct workers.
        ref = [items[b::W] for b in range(W)]
    limit = min(max(_load(b, p) for b in ref) + SLACK * a, mean + a) + tol
    for keep in (True, False):
        if (kept := _repair(p, counts, held, node, near, S, limit, mean - a - tol, keep, tol)) is not None:
            return [sorted(k) for k in kept]
    # Last resort: each reference bin to the worker that holds most of it already.
    out: dict[int, list[int]] = {}
    for _, w, b in sorted((-len(held[w].intersection(x)), w, b) for w in range(W) for b, x in enumerate(ref)):
        if w not in out and all(y is not ref[b] for y in out.values()):
            out[w] = ref[b]
    return [sorted(out[w]) for w in range(W)]


def _repair(p: list[float], counts: list[int], held: list[set[int]], node: list[str], near: dict[int, set[str]],
            S: int, limit: float, low: float, keep: bool, tol: float = 0.0) -> list[list[int]] | None:
    """[W] experts with every load in [low, limit], or None if stuck; keep: start from what is held."""
    W, mean = len(held), math.fsum(x * c for x, c in zip(p, counts)) / len(held)
    kept: list[list[int]] = [[] for _ in range(W)]
    missing, pool = list(counts), []
    for w in range(W) if keep else ():
        for e in sorted(held[w]):  # an expert stays on up to counts[e] holders, in worker order
            if missing[e] > 0:
                kept[w].append(e)
                missing[e] -= 1
        kept[w].sort(key=lambda e: (p[e], e))
        while len(kept[w]) > S:  # the lightest frees a slot and moves the least load
            pool.append(kept[w].pop(0))
        # Shed above limit + tol, looser than we place to, so a placement made here never
        # triggers a move when re-planned. One item if one is large enough (the one leaving the
        # worker nearest the mean), else the largest.
        while (excess := (load := _load(kept[w], p)) - limit - tol) > 0:
            big = [e for e in kept[w] if p[e] >= excess] or kept[w][-1:]
            pool.append(e := min(big, key=lambda e: (abs(load - p[e] - mean), -e)))
            kept[w].remove(e)
    pool += [e for e in range(len(p)) for _ in range(missing[e])]
    loads = [_load(k, p) for k in kept]
    for e in sorted(pool, key=lambda e: (-p[e], e)):
        x_near = near.get(e, ())
        ok = [(loads[w] + p[e] > limit, e not in held[w], loads[w], node[w] not in x_near, len(kept[w]), w)
              for w in range(W) if len(kept[w]) < S and e not in kept[w]]
        if not ok:
            return None
        _shift(kept, loads, p, e, None, min(ok)[-1])
    # Overloads left where slots ran out (every slot is used when W*S = E): move an item of the
    # most-loaded worker to a free slot, or swap it for a smaller one. Each step lowers the total
    # load over the limit and leaves the other worker under it, so the loop ends.
    while max(loads) > limit:
        w = max(range(W), key=lambda w: (loads[w], -w))
        steps = [(max(loads[w] - d, limit), y is not None, v, x, y)
                 for v in range(W) if v != w for x in kept[w] if x not in kept[v]
                 for y in [None] * (len(kept[v]) < S) + [y for y in kept[v] if y not in kept[w]]
                 if (d := p[x] - (p[y] if y is not None else 0)) > 0 and loads[v] + d <= limit]
        if not steps:
            return None
        _, _, v, x, y = min(steps, key=lambda s: s[:2])
        _shift(kept, loads, p, x, w, v)
        if y is not None:
            _shift(kept, loads, p, y, v, w)
    # A worker far below the mean (e.g. a new one while all others are within the limit) takes
    # the largest item that leaves its giver above it: the sum of squared loads falls, so it ends.
    while min(loads) < low:
        w = min(range(W), key=lambda w: (loads[w], w))
        give = [(loads[v], -v, p[e], e, v) for v in range(W) for e in kept[v] if len(kept[w]) < S
                and e not in kept[w] and 0 < p[e] < loads[v] - loads[w] and loads[w] + p[e] <= limit]
        if not give:
            return None
        *_, e, v = max(give)
        _shift(kept, loads, p, e, v, w)
    return kept


def _shift(kept: list[list[int]], loads: list[float], p: list[float], e: int, src: int | None, dst: int) -> None:
    if src is not None:
        kept[src].remove(e)
        loads[src] -= p[e]
    kept[dst].append(e)
    loads[dst] += p[e]


def _moves(old: Placement, new: Placement, nodes: Mapping[str, str]) -> tuple[Move, ...]:
    sends: Counter[str] = Counter()  # moves asked of each source so far, to spread them
    moves = []
    before = dict(zip(old.workers, old.experts))
    for l in range(new.num_layers):
        holders = old.log2phy(l)
        for dst, layers in zip(new.workers, new.experts):
            for e in (e for e in layers[l] if e not in (before[dst][l] if dst in before else ())):
                srcs = [old.workers[i] for i in holders.get(e, ())]
                same = [s for s in srcs if nodes[s] == nodes[dst]]  # a remap copies nothing
                src = min(same or srcs, key=lambda s: sends[s], default=None)  # ties: worker order
                if src is not None:
                    sends[src] += 1
                moves.append(Move(l, e, dst, src, src is not None and nodes[src] == nodes[dst]))
    return tuple(moves)


def _releases(old: Placement, new: Placement) -> tuple[tuple[str, int, int], ...]:
    after = dict(zip(new.workers, new.experts))
    return tuple((w, l, e) for w, layers in zip(old.workers, old.experts) for l, es in enumerate(layers)
                 for e in es if w not in after or e not in after[w][l])
