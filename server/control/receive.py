"""The receives of a change's **prepare**: every worker of the new placement gets the experts it
lacks before the commit, in two stages.

First every move whose source exists already: a segment of the old topology (remapped on its
node, copied peer to peer across nodes) or the checkpoint. Then the remaps of segments a node-mate
has just read from disk in this change: the planner has each node read an expert from disk once
(experts/placement/planner.py), so those moves can only start once that read is done. Workers
receive in parallel within a stage; a failure anywhere ends the receives and is returned, with
what had arrived, for the controller to undo.
"""
from __future__ import annotations

from typing import Mapping

import ray

from experts.placement.planner import Move, Plan
from experts.worker.actor import Incoming, ReceiveResult, WorkerInfo

Segments = dict[tuple[str, int, int], str]   # (worker, MoE layer, expert) -> segment name


def stages(plan: Plan, old_segments: Mapping[tuple[str, int, int], str]) -> tuple[list[Move], list[Move]]:
    """(moves that can start now, remaps of segments this change creates first)."""
    now: list[Move] = []
    after: list[Move] = []
    for m in plan.moves:
        (after if m.src is not None and (m.src, m.layer, m.expert) not in old_segments else now).append(m)
    return now, after


def receive_all(plan: Plan, old_segments: Segments, infos: Mapping[str, WorkerInfo], handles: Mapping,
                timeout: float) -> tuple[list[ReceiveResult], Exception | None]:
    """Run both stages through the workers' `receive`. Returns what arrived and the first failure
    (None when every receive succeeded)."""
    results: list[ReceiveResult] = []
    segments = dict(old_segments)
    for stage in stages(plan, old_segments):
        if not stage:
            continue
        by_dst: dict[str, list[Incoming]] = {}
        for m in stage:
            if m.src is None:
                item = Incoming(m.layer, m.expert, "disk")
            else:
                name = segments[(m.src, m.layer, m.expert)]
                item = Incoming(m.layer, m.expert, "remap" if m.same_node else "peer", name,
                                infos[m.src].transfer_address)
            by_dst.setdefault(m.dst, []).append(item)
        refs = {w: handles[w].receive.remote(items) for w, items in by_dst.items()}
        failure: Exception | None = None
        for w, ref in refs.items():
            try:
                res = ray.get(ref, timeout=timeout)
            except Exception as exc:  # a dead worker, a failed transfer, a timeout
                failure = failure or RuntimeError(f"prepare failed on worker {w}: {exc}")
                continue
            results.append(res)
            segments.update({(res.worker_id, l, e): n for (l, e), n in res.segments.items()})
        if failure is not None:
            return results, failure
    return results, None
