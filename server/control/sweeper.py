"""Reclaiming shared segments on every node: one small sweeper actor per node, started when needed.

A dead worker cannot unlink what it created, and `/dev/shm` is per node: its segments must be
removed by a process on its node (the server itself on its own node, else the node's sweeper). After a failover has committed (the survivors have remapped
what they need), the sweeper on the dead worker's node removes the dead worker's segments that
the serving topology no longer names. The same actor sweeps namespaces whose owners are all gone
(a server killed with SIGKILL) when a server starts using that node (memory/owners.py).

The actor takes no CPU reservation and imports neither torch nor the model: it lists a directory
and unlinks files.
"""
from __future__ import annotations

import logging
import threading

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from memory.owners import sweep_orphans, unlink_worker_segments

log = logging.getLogger(__name__)
SWEEP_TIMEOUT_S = 60.0


class NodeSweeper:
    """Runs on one node (as a Ray actor): removes segments there."""

    def reclaim(self, namespace: str, worker_id: str, keep: list[str]) -> int:
        return unlink_worker_segments(namespace, worker_id, frozenset(keep))

    def sweep_orphans(self) -> dict[str, int]:
        return sweep_orphans()


_RayNodeSweeper = ray.remote(num_cpus=0, max_restarts=0)(NodeSweeper)


class Sweepers:
    """The server's sweeper actors, one per node it has needed one on."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._by_node: dict[str, object] = {}

    def _on(self, node_id: str) -> object:
        with self._lock:
            handle = self._by_node.get(node_id)
            if handle is None:
                handle = self._by_node[node_id] = _RayNodeSweeper.options(
                    name=f"{self.namespace}-sweeper-{node_id[:12]}",
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
            return handle

    def reclaim(self, node_id: str, worker_id: str, keep: set[str]) -> int:
        """Remove on `node_id` the segments `worker_id` (dead) created, except `keep`; returns the count."""
        try:
            if node_id == ray.get_runtime_context().get_node_id():
                # the server's own node: no actor (a process start takes a core from the streams
                # for a second, right after a failover)
                removed = unlink_worker_segments(self.namespace, worker_id, frozenset(keep))
            else:
                removed = ray.get(self._on(node_id).reclaim.remote(self.namespace, worker_id, sorted(keep)),
                                  timeout=SWEEP_TIMEOUT_S)
        except Exception as exc:
            raise RuntimeError(f"reclaiming the segments of lost worker {worker_id} on node {node_id[:12]} "
                               f"failed: {exc}") from exc
        log.info("reclaimed %d segments of lost worker %s on node %s", removed, worker_id, node_id[:12])
        return removed

    def sweep_orphans(self, node_id: str) -> dict[str, int]:
        """Remove, on `node_id`, the segments of namespaces whose owners there are all gone."""
        removed = ray.get(self._on(node_id).sweep_orphans.remote(), timeout=SWEEP_TIMEOUT_S)
        if removed:
            log.warning("removed segments left by servers that are gone on node %s: %s", node_id[:12], removed)
        return removed

    def shutdown(self) -> None:
        with self._lock:
            handles, self._by_node = list(self._by_node.values()), {}
        for h in handles:
            try:
                ray.kill(h)
            except Exception:   # already gone with its node
                pass
