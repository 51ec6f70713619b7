"""Experts shared within a node: every worker of a node holds every expert its node holds.

On one node a worker reaches another's expert by mapping the same segment (a remap: no byte
copied, no memory added), so a replica there is free. Placed on every worker of the node, any of
them can run any of the node's experts, and the engine spreads each layer's experts over them by
the step's work (server/engine/replicas.py) rather than by who loaded what. A lost worker's
experts are then still held by its node's other workers: its loss is a reroute. Across nodes a
replica would be a copy: experts stay partitioned between nodes as placed. Pure: no torch, no ray.
"""
from __future__ import annotations

from collections.abc import Sequence


def share_on_nodes(bins: Sequence[Sequence[int]], node_of: Sequence[str], slots: int) -> list[list[int]]:
    """One layer: [W] experts per worker, [W] node of each worker -> [W] experts per worker where
    each worker holds its node's union, if that fits its `slots`; a worker whose node holds more
    than `slots` experts keeps its own."""
    if len(bins) != len(node_of):
        raise ValueError(f"{len(bins)} workers' experts but {len(node_of)} nodes")
    union: dict[str, set[int]] = {}
    for experts, node in zip(bins, node_of):
        union.setdefault(node, set()).update(experts)
    return [sorted(union[node]) if len(union[node]) <= slots else sorted(experts)
            for experts, node in zip(bins, node_of)]
