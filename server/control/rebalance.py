"""Live load balancing: expert load over a sliding window, its imbalance, and rebalances by it.

The engine reports every step's routed tokens per MoE layer (`EngineObserver.on_expert_tokens`);
`ExpertLoadWindow` keeps them in a ring of time buckets, like EPLB's window of recent steps, so the
load it gives follows what clients send now, not what they sent an hour ago. `Rebalancer` ticks
once a second: it exports the imbalance the committed placement has under that load, and when
`RebalanceRule` (experts/placement/balance.py) asks for it, plans a rebalance, and runs it as an
ordinary change when the plan is worth it. On one node every move of a rebalance is a remap:
zero bytes copied, and the engine switches versions between two steps.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from experts.placement.balance import RebalanceGate, RebalanceRule, imbalance
from experts.placement.planner import Placement, plan_placement
from server.control.topology import ChangeReport, ScaleRejected, Topology

log = logging.getLogger(__name__)

BUCKETS = 10    # the window ages out in tenths: a token leaves it between 0.9 and 1.0 windows later
TICK_S = 1.0


class ExpertLoadWindow:
    """Routed tokens per (MoE layer, expert) over about the last `window_s` seconds."""

    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"--rebalance-window {window_s!r} must be > 0 seconds")
        self.index = {layer: i for i, layer in enumerate(moe_layers)}   # checkpoint layer -> MoE index
        self.window_s = window_s
        self.width = window_s / BUCKETS
        self.clock = clock
        self._lock = threading.Lock()   # the engine thread adds while the rebalancer reads
        self._counts = np.zeros((BUCKETS, len(moe_layers), num_experts), dtype=np.int64)
        self._bucket = np.full(BUCKETS, -1, dtype=np.int64)             # which time bucket each slot holds

    def add(self, layer: int, counts: np.ndarray) -> None:
        """One step's tokens routed to each expert of `layer` (checkpoint numbering)."""
        b = int(self.clock() // self.width)
        with self._lock:
            slot = b % BUCKETS
            if self._bucket[slot] != b:      # the slot still holds a bucket that left the window
                self._counts[slot] = 0
                self._bucket[slot] = b
            self._counts[slot, self.index[layer], :len(counts)] += counts

    def load(self) -> np.ndarray:
        """[L][E] tokens routed in the window."""
        b = int(self.clock() // self.width)
        with self._lock:
            live = self._bucket > b - BUCKETS
            return self._counts[live].sum(axis=0)


def plan_rebalance(topology: Topology, load: list[list[float]], slots: int, replicate_hot: bool,
                   redundant: int = 0, share_node: bool = False) -> Placement:
    """The placement a rebalance of `topology` by `load` would commit (the controller plans the
    same, with the same options: the planner is deterministic)."""
    p = topology.placement
    nodes = {w: info.node_id for w, info in topology.workers.items()}
    return plan_placement(p, p.workers, nodes, p.num_layers, len(load[0]), slots, load=load,
                          replicate_hot=replicate_hot, redundant=redundant, share_node=share_node).placement


class Rebalancer:
    """Ticks once a second: exports the imbalance and rebalances when the rule says so.

    topology: the committed topology (None before the first). plan: load -> the placement a
    rebalance would commit. rebalance: runs one (an operation) with that load. on_imbalance: the
    gauge."""

    def __init__(self, window: ExpertLoadWindow, rule: RebalanceRule, topology: Callable[[], Topology | None],
                 plan: Callable[[list[list[float]]], Placement],
                 rebalance: Callable[[list[list[float]]], ChangeReport],
                 on_imbalance: Callable[[float], None], tick_s: float = TICK_S) -> None:
        self.window, self.rule, self.gate = window, rule, RebalanceGate(rule)
        self.topology, self.plan, self.rebalance, self.on_imbalance = topology, plan, rebalance, on_imbalance
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rebalancer", daemon=True)

    def imbalance(self) -> tuple[float, list[list[float]], int]:
        """(imbalance of the committed placement under the window's load, that load, its tokens)."""
        topo = self.topology()
        load = self.window.load()
        tokens = int(load.sum())
        rows = load.astype(float).tolist()
        return (imbalance(topo.placement, rows) if topo is not None and tokens else 1.0), rows, tokens

    def tick(self, now: float) -> ChangeReport | None:
        current, load, tokens = self.imbalance()
        self.on_imbalance(current)
        if not self.gate.wants(now, current, tokens):
            return None
        topo = self.topology()
        planned = imbalance(self.plan(load), load)
        if not self.gate.worth(current, planned):
            log.info("expert load imbalance %.2f, but a rebalance would only reach %.2f: not worth a change",
                     current, planned)
            self.gate.declined(current)
            return None
        log.info("expert load imbalance %.2f >= %.2f: rebalancing topology v%d (planned %.2f)",
                 current, self.rule.threshold, topo.version if topo else 0, planned)
        try:
            report = self.rebalance(load)
        except ScaleRejected as exc:     # another change runs: the next tick looks again
            log.info("rebalance deferred: %s", exc)
            return None
        except Exception:                # aborted: the old topology serves on; wait an interval
            log.exception("rebalance aborted")
            self.gate.ran(now, current)
            return None
        self.gate.ran(now, imbalance(report.topology.placement, load))
        self.on_imbalance(self.imbalance()[0])
        return report

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick(time.monotonic())
            except Exception:  # the rebalancer must not die with one bad tick; serving goes on
                log.exception("rebalancer tick failed")
