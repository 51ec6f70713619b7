"""One MoE layer's placement, in named steps; each a small pure function (no torch, ray or I/O).

Words: an *item* is one replica of a logical expert; ``p[e]`` is the load of one replica of expert
e (its load split evenly over its replicas); a *bin* is the list of items one worker holds, at most
S of them, never two replicas of one expert.

    replicate  [E] load           -> Items: [E] load per replica, [E] replica counts
    pack       Items              -> [W] bins balanced from scratch (the reference)
    keep       [W] experts held   -> [W] bins kept within the band + the pool of items to place
    assign     [W] bins + pool    -> [W] bins: each pooled item, largest first, to the least-loaded
    relieve    [W] bins           -> [W] bins: none above the limit (single moves or swaps)
    lift       [W] bins           -> [W] bins: none far below the mean

The band (mean = total load / W, a = the largest item, B = the largest bin of the reference):
    mean - a  <=  every worker's load  <=  limit = min(B + SLACK * a, mean + a)
`place_layer` keeps what workers hold, sheds few items to get under the limit, and places the pool;
if that gets stuck, it places every item afresh, each preferring its current holders; then it
takes the reference. A placement within the band is kept as is, so re-planning with unchanged
workers and load moves nothing; SLACK < 1 keeps uniform load exact (<= ceil(E/W) experts each).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

HOT_FACTOR = 2.0  # an expert is hot while its load per replica exceeds this x the layer's mean expert load
SLACK = 0.25  # load tolerated above the reference, in largest items, before experts move (less churn)
_EPS = 1e-9  # relative tolerance on float load sums

Bins = list[list[int]]  # [W] -> experts held by worker w in this layer


@dataclass(frozen=True)
class Items:
    """One layer's items. p: [E] load of one replica of expert e; counts: [E] replicas of e;
    slots: S per worker."""

    p: tuple[float, ...]
    counts: tuple[int, ...]
    slots: int

    def order(self) -> list[int]:
        """[sum(counts)] every item, largest first; ties by expert id, so replicas are adjacent."""
        return sorted((e for e in range(len(self.p)) for _ in range(self.counts[e])), key=lambda e: (-self.p[e], e))

    def load(self, experts: Iterable[int]) -> float:
        return math.fsum(self.p[e] for e in experts)  # exact, so independent of the order of experts

    def mean(self, workers: int) -> float:
        return self.load(self.order()) / workers

    def tol(self, workers: int) -> float:
        return _EPS * (self.mean(workers) + max(self.p))


@dataclass(frozen=True)
class Affinity:
    """Where the experts are now, to keep them there. held: [W] experts each target worker holds
    (empty for a joining one); node: [W] node of each target; near: expert -> nodes with a live copy."""

    held: tuple[frozenset[int], ...]
    node: tuple[str, ...]
    near: Mapping[int, frozenset[str]]

    @staticmethod
    def none(workers: int) -> Affinity:
        return Affinity((frozenset(),) * workers, ("",) * workers, {})


@dataclass(frozen=True)
class Band:
    """Every worker's load must end in [low, limit] (the float tolerance ``tol`` folded in); mean:
    the layer's mean worker load."""

    low: float
    limit: float
    mean: float
    tol: float

    @staticmethod
    def around(items: Items, reference: Bins) -> Band:
        W, a = len(reference), max(items.p)
        mean, tol = items.mean(W), items.tol(W)
        limit = min(max(items.load(b) for b in reference) + SLACK * a, mean + a) + tol
        return Band(mean - a - tol, limit, mean, tol)


def replicate(row: Sequence[float] | None, E: int, W: int, S: int, hot: bool, redundant: int = 0) -> Items:
    """[E] routed-token counts (None or all zero: uniform) -> Items. With ``hot``, the W*S - E spare
    slots go, one at a time, to the expert hottest per replica while it exceeds HOT_FACTOR x the
    mean expert load; replicas never share a worker, so an expert has at most W. The first
    ``redundant`` spare slots (vLLM's num_redundant_experts) take a replica whatever the load: a
    lost worker's experts then have live copies to reroute to."""
    a = [float(x) for x in row] if row is not None and math.fsum(row) > 0 else [1.0] * E
    counts, threshold = [1] * E, HOT_FACTOR * math.fsum(a) / E
    for i in range(W * S - E if hot else min(redundant, W * S - E)):
        e = max((e for e in range(E) if counts[e] < W), key=lambda e: (a[e] / counts[e], -e), default=None)
        if e is None or (i >= redundant and a[e] / counts[e] <= threshold):
            break
        counts[e] += 1
    return Items(tuple(a[e] / counts[e] for e in range(E)), tuple(counts), S)


def pack(items: Items, W: int) -> Bins:
    """Items -> [W] bins from scratch, every bin within mean +- a: greedy largest-first to the
    least-loaded worker; if that misses the bound (slots run out), dealing."""
    order, a, tol = items.order(), max(items.p), items.tol(W)
    mean = items.mean(W)
    bins = assign(items, [[] for _ in range(W)], order, Affinity.none(W), math.inf)
    if bins is not None and all(mean - a - tol <= items.load(b) <= mean + a + tol for b in bins):
        return bins
    # Dealing: bin b gets items b, b+W, ...; each is no larger than any item of the round before
    # and no smaller than any of the round after, so every bin is within mean +- a. Replicas of an
    # expert are adjacent items, so they land on distinct workers.
    return [order[b::W] for b in range(W)]


def keep(items: Items, held: Sequence[frozenset[int]], band: Band) -> tuple[Bins, list[int]]:
    """[W] experts held now -> ([W] bins kept, [N] pooled items that still need a worker).

    An expert stays on up to counts[e] of its holders, in worker order. A worker over S slots drops
    its lightest items (the least load moved per slot freed). A worker above limit + tol, looser
    than we place to, so a placement made here never moves again when re-planned, sheds one item
    if one is large enough (the one leaving it nearest the mean), else its largest, until under."""
    p, missing = items.p, list(items.counts)
    bins: Bins = [[] for _ in held]
    pool: list[int] = []
    for w, experts in enumerate(held):
        for e in sorted(experts):
            if missing[e] > 0:
                bins[w].append(e)
                missing[e] -= 1
        bins[w].sort(key=lambda e: (p[e], e))
        while len(bins[w]) > items.slots:
            pool.append(bins[w].pop(0))
        while (excess := (load := items.load(bins[w])) - band.limit - band.tol) > 0:
            big = [e for e in bins[w] if p[e] >= excess] or bins[w][-1:]
            pool.append(e := min(big, key=lambda e: (abs(load - p[e] - band.mean), -e)))
            bins[w].remove(e)
    return bins, pool + [e for e in range(len(p)) for _ in range(missing[e])]


def assign(items: Items, bins: Bins, pool: Sequence[int], affinity: Affinity, limit: float) -> Bins | None:
    """[W] bins + [N] pooled items -> [W] bins, or None if an item finds no free slot.

    Largest item first, to a worker with a free slot and no replica of it, preferring in turn: one
    it fits under the limit, one that holds it now (no move), the least loaded, one on a node with
    a live copy (a remap, not a copy), the fewest items, worker order."""
    p, bins = items.p, [list(b) for b in bins]
    loads = [items.load(b) for b in bins]
    for e in sorted(pool, key=lambda e: (-p[e], e)):
        near = affinity.near.get(e, frozenset())
        ok = [(loads[w] + p[e] > limit, e not in affinity.held[w], loads[w], affinity.node[w] not in near,
               len(bins[w]), w) for w in range(len(bins)) if len(bins[w]) < items.slots and e not in bins[w]]
        if not ok:
            return None
        w = min(ok)[-1]
        bins[w].append(e)
        loads[w] += p[e]
    return bins


def relieve(items: Items, bins: Bins, limit: float) -> Bins | None:
    """[W] bins -> [W] bins all under ``limit``, or None if stuck. Overloads are left where slots ran
    out (every slot is used when W*S = E): move an item of the most-loaded worker to a free slot,
    or swap it for a smaller one. Each step lowers the total load over the limit and leaves the
    other worker under it, so the loop ends."""
    p, bins, S = items.p, [list(b) for b in bins], items.slots
    loads = [items.load(b) for b in bins]
    while max(loads) > limit:
        w = max(range(len(bins)), key=lambda w: (loads[w], -w))
        steps = [(max(loads[w] - d, limit), y is not None, v, x, y)
                 for v in range(len(bins)) if v != w for x in bins[w] if x not in bins[v]
                 for y in [None] * (len(bins[v]) < S) + [y for y in bins[v] if y not in bins[w]]
                 if (d := p[x] - (p[y] if y is not None else 0)) > 0 and loads[v] + d <= limit]
        if not steps:
            return None
        _, _, v, x, y = min(steps, key=lambda s: s[:2])
        _shift(bins, loads, p, x, w, v)
        if y is not None:
            _shift(bins, loads, p, y, v, w)
    return bins


def lift(items: Items, bins: Bins, band: Band) -> Bins | None:
    """[W] bins -> [W] bins none below ``band.low``, or None if stuck. A worker far below the mean
    (a new one, while the others are within the limit) takes the largest item that leaves its
    giver above it: the sum of squared loads falls, so the loop ends."""
    p, bins, S = items.p, [list(b) for b in bins], items.slots
    loads = [items.load(b) for b in bins]
    while min(loads) < band.low:
        w = min(range(len(bins)), key=lambda w: (loads[w], w))
        give = [(loads[v], -v, p[e], e, v) for v in range(len(bins)) for e in bins[v] if len(bins[w]) < S
                and e not in bins[w] and 0 < p[e] < loads[v] - loads[w] and loads[w] + p[e] <= band.limit]
        if not give:
            return None
        *_, e, v = max(give)
        _shift(bins, loads, p, e, v, w)
    return bins


def settle(items: Items, start: Bins, pool: Sequence[int], affinity: Affinity, band: Band) -> Bins | None:
    """assign, relieve, lift: [W] bins kept + [N] pool -> [W] bins within the band, or None."""
    bins = assign(items, start, pool, affinity, band.limit)
    bins = relieve(items, bins, band.limit) if bins is not None else None
    return lift(items, bins, band) if bins is not None else None


def place_layer(items: Items, affinity: Affinity) -> Bins:
    """Items and where experts are now -> [W] sorted experts per target worker, within the band."""
    W = len(affinity.held)
    reference = pack(items, W)
    band = Band.around(items, reference)
    # keep what is held; if stuck, place all afresh (assign still prefers the current holders)
    for held in (affinity.held, (frozenset(),) * W):
        start, pool = keep(items, held, band)
        if (bins := settle(items, start, pool, affinity, band)) is not None:
            return [sorted(b) for b in bins]
    return closest(reference, affinity.held)


def closest(reference: Bins, held: Sequence[frozenset[int]]) -> Bins:
    """Last resort: [W] reference bins -> [W] sorted experts, each bin to the worker that holds most
    of it already (ties: worker order, then bin order)."""
    out: dict[int, int] = {}  # worker -> index of its reference bin
    ranked = sorted((-len(held[w].intersection(x)), w, b) for w in range(len(held)) for b, x in enumerate(reference))
    for _, w, b in ranked:
        if w not in out and b not in out.values():
            out[w] = b
    return [sorted(reference[out[w]]) for w in range(len(held))]


def _shift(bins: Bins, loads: list[float], p: Sequence[float], e: int, src: int, dst: int) -> None:
    bins[src].remove(e)
    loads[src] -= p[e]
    bins[dst].append(e)
    loads[dst] += p[e]
