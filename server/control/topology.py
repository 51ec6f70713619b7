"""What a change of topology produces: the topology itself and the report of the change."""
from __future__ import annotations

from dataclasses import dataclass, field

from experts.placement.planner import Placement
from experts.worker.actor import WorkerInfo


class ScaleRejected(Exception):
    """A change that cannot start now (one is running, or the cluster cannot hold the target)."""


@dataclass(frozen=True)
class Topology:
    version: int
    placement: Placement
    workers: dict[str, WorkerInfo]
    segments: dict[tuple[str, int, int], str]   # (worker, MoE layer, expert) -> segment name


@dataclass
class ChangeReport:
    direction: str                  # up | down | rebalance
    topology: Topology
    seconds: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)   # plan, start, transfer, commit, release
    bytes_remapped: int = 0
    bytes_copied: int = 0
    bytes_loaded: int = 0
    moves: dict[str, int] = field(default_factory=dict)      # experts moved per path: remap, peer, disk
    warnings: list[str] = field(default_factory=list)       # what failed after the commit (release)
