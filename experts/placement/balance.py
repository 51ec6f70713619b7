"""Load imbalance of a placement, and when to rebalance it: pure (no torch, ray or I/O).

Shapes: L MoE layers, E experts per layer, W workers.

The imbalance of a placement under a load is max/mean tokens per worker, summed over layers:

    imbalance = sum_l max_w load(l, w) / sum_l mean_w load(l, w)

Each MoE layer's exchange waits for its slowest worker, so a step costs the per-layer maxima; the
figure is how much longer that is than a perfect split (1.0 = balanced, W = one worker does all).
A replicated expert's tokens split evenly over its replicas, as the engine splits them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from experts.placement.plan import Placement


def worker_loads(placement: Placement, load: Sequence[Sequence[float]]) -> list[list[float]]:
    """[L][E] tokens -> [L][W] tokens each worker runs (replicas share their expert's tokens)."""
    W = len(placement.workers)
    out = []
    for l, row in enumerate(load):
        holders = placement.log2phy(l)
        per = [0.0] * W
        for e, ws in holders.items():
            for w in ws:
                per[w] += row[e] / len(ws)
        out.append(per)
    return out


def imbalance(placement: Placement, load: Sequence[Sequence[float]]) -> float:
    """max/mean tokens per worker over the layers (module docstring); 1.0 without load."""
    if len(load) != placement.num_layers:
        raise ValueError(f"load has {len(load)} layers, the placement {placement.num_layers}")
    per = worker_loads(placement, load)
    total_max = math.fsum(max(ws) for ws in per)
    total_mean = math.fsum(math.fsum(ws) / len(ws) for ws in per)
    return total_max / total_mean if total_mean > 0 else 1.0


@dataclass(frozen=True)
class RebalanceRule:
    """When the serving load asks for a rebalance.

    threshold: rebalance once the imbalance reaches this (0 = never by itself; by hand only).
    band: hysteresis. A rebalance must promise to lower the imbalance by at least `band`; after
      one, the next waits until the imbalance has fallen below `threshold - band` (the load evened
      out) or risen `band` above what the last one reached (the load moved elsewhere), so a load
      the planner cannot even out (one expert hotter than a worker's share) is not replanned
      again and again.
    interval_s: at least this long between two rebalances.
    min_tokens: fewer routed tokens in the window than this say nothing yet.
    """
    threshold: float = 0.0
    band: float = 0.1
    interval_s: float = 60.0
    min_tokens: int = 1024

    def __post_init__(self) -> None:
        if not (self.threshold == 0 or self.threshold > 1) or not math.isfinite(self.threshold):
            raise ValueError(f"--rebalance-threshold {self.threshold!r} must be 0 (off) or > 1")
        if not self.band > 0 or (self.threshold and self.band >= self.threshold - 1):
            raise ValueError(f"rebalance band {self.band!r} must be > 0 and below threshold - 1")
        if not (self.interval_s >= 0 and math.isfinite(self.interval_s)):
            raise ValueError(f"--rebalance-interval {self.interval_s!r} must be >= 0 seconds")
        if self.min_tokens < 0:
            raise ValueError(f"rebalance min_tokens {self.min_tokens!r} must be >= 0")


class RebalanceGate:
    """The hysteresis of RebalanceRule as a small state machine, fed the current figures."""

    def __init__(self, rule: RebalanceRule) -> None:
        self.rule = rule
        self.armed = True
        self.last_at: float | None = None     # when the last rebalance ran
        self.reached = math.inf               # the imbalance the last rebalance left

    def wants(self, now: float, current: float, tokens: int) -> bool:
        """Whether to plan a rebalance now (cheap: no plan needed)."""
        r = self.rule
        if r.threshold == 0 or tokens < r.min_tokens:
            return False
        if current < r.threshold - r.band or current > self.reached + r.band:
            self.armed = True
        return (self.armed and current >= r.threshold
                and (self.last_at is None or now - self.last_at >= r.interval_s))

    def worth(self, current: float, planned: float) -> bool:
        """Whether a plan that would leave `planned` is worth a change from `current`."""
        return planned <= current - self.rule.band

    def ran(self, now: float, reached: float) -> None:
        """A rebalance committed, leaving imbalance `reached` under the window's load."""
        self.armed, self.last_at, self.reached = False, now, reached

    def declined(self, current: float) -> None:
        """The plan was not worth it: wait, as after a rebalance, for the load to change."""
        self.armed, self.reached = False, current
