"""Which replica serves each (token, expert) pair of one MoE layer: the step's work balanced over
the workers holding each expert. Numpy only (no torch or ray calls; from the wire it takes the
one threshold it shares with the ring, SMALL_PAIRS).

A group (one expert's pairs in the layer) costs its worker the expert's weights read once plus
its pairs, so the cost of a group of n pairs is EXPERT_COST + n, in pairs. Groups whose expert has
a single holder go there. A group larger than SPLIT_PAIRS (prefill, a very hot expert) is split
over its holders by token index: token t to holder t mod holders, each holder reading the weights
for its share. Every other group goes whole, largest first, to the holder with the least work so
far (ties: worker order): a replicated expert is read once, not once per holder, and a layer's
experts spread over the workers that can run them. On one node a replica costs no memory (the
workers map the same segment), so with every expert on every worker of the node this spreads
each layer evenly (measured on 2 cores, 2 workers, fp32 decode: batch 8/16/32 +12/+32/+25% tok/s
against experts split between the workers). Under a node lead (server/engine/exchange.py, the
default) the holder tables list one worker per node, so this balances across nodes only.

A layer of at most SMALL_PAIRS pairs (decode at batch 1-2) goes whole to the first worker that
holds all of its experts, if one does: such an exchange is all latency (wake-ups, not weights),
one worker answers it, and only that worker and the engine spin while they wait
(experts/wire/ring.py).

The choice is a pure function of the layer's routed ids and the holder tables: the same batch
always goes the same way, and each pair's result does not depend on which worker computes it.
"""
from __future__ import annotations

import numpy as np

from experts.wire.ring import SMALL_PAIRS

EXPERT_COST = 16     # an expert's weights read once, in pairs' worth of work (decode, CPU, measured)
SPLIT_PAIRS = 64     # a replicated group above this many pairs is split over its holders


def assign(holders: np.ndarray, count: np.ndarray, ids: np.ndarray, top_k: int, workers: int,
           routed: np.ndarray | None = None) -> np.ndarray:
    """holders [E, R] worker indices (the first count[e] valid), count [E], ids [T*K] experts per
    pair token-major -> [T*K] worker index serving each pair. `routed` [E]: pairs per expert in
    `ids`, when the caller has counted them already."""
    if ids.shape[0] <= SMALL_PAIRS:
        one = _holder_of_all(holders, count, ids, workers)
        if one is not None:
            return np.full(ids.shape[0], one, dtype=holders.dtype)
    token = np.arange(ids.shape[0]) // top_k
    owner = holders[ids, token % count[ids]]            # split groups (and single holders) as they are
    if routed is None:
        routed = np.bincount(ids, minlength=count.shape[0])
    whole = np.flatnonzero((count > 1) & (routed > 0) & (routed <= SPLIT_PAIRS))
    if whole.size == 0:
        return owner
    work = np.zeros(workers)
    fixed = (count == 1) & (routed > 0)
    np.add.at(work, holders[fixed, 0], routed[fixed] + EXPERT_COST)
    split = np.flatnonzero((count > 1) & (routed > SPLIT_PAIRS))
    for e in split.tolist():
        n, k = int(routed[e]), int(count[e])
        work[holders[e, :k]] += EXPERT_COST + n / k
    table = holders[:, 0].copy()
    for e in whole[np.argsort(-routed[whole], kind="stable")].tolist():
        hs = holders[e, :count[e]]
        w = hs[np.argmin(work[hs])]
        work[w] += routed[e] + EXPERT_COST
        table[e] = w
    pick = np.isin(ids, whole)
    owner[pick] = table[ids[pick]]
    return owner


def _holder_of_all(holders: np.ndarray, count: np.ndarray, ids: np.ndarray, workers: int) -> int | None:
    """The first worker holding every expert in `ids`, or None."""
    common = np.ones(workers, dtype=bool)
    for e in np.unique(ids).tolist():
        held = np.zeros(workers, dtype=bool)
        held[holders[e, :count[e]]] = True
        common &= held
    return int(common.argmax()) if common.any() else None
