"""Plugging the autoscaler into a running server: `elasticmoe serve --autoscale policy.yaml`.

`server/autoscale/policy.py` decides and `server/autoscale/runner.py` ticks; both know no server. This
module gives them one: a `MetricsSnapshot` read from the server's rolling windows, engine queue
and controller, and callables that scale, check and request capacity, and export the target.

Words:
- **saturated**: requests were waiting when the snapshot was taken, so the engine had more work
  than it ran and the tokens/s it reached is what the current workers can give.
- **capacity**: per-worker generated tokens/s at saturation, *measured*: the highest saturated
  windowed rate seen, divided by the worker count it was measured on. Judged only on a window
  taken entirely on one topology (no sample from before the last change). Unknown (None) until
  the server has been saturated once; the policy then scales down only an idle server.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Protocol

from server.autoscale.runner import AutoscaleRunner
from server.autoscale.policy import AutoscalePolicy, Decision, MetricsSnapshot

if TYPE_CHECKING:
    from server.autoscale.windows import LatencyWindow, RateWindow
    from server.control.controller import Controller
    from server.engine.loop import Engine
    from server.metrics import ServerMetrics


class ServingWindows(Protocol):
    """The sliding windows of what the server served (server/app.py `ServingStats`)."""
    ttft: LatencyWindow
    itl: LatencyWindow
    tokens: RateWindow

    def set_window(self, window_s: float) -> None: ...


class Server(Protocol):
    """What the autoscaler reads from and asks of the running server (server/app.py `Server`)."""
    controller: Controller | None
    engine: Engine
    stats: ServingWindows
    metrics: ServerMetrics

    def scale(self, num_workers: int) -> object: ...

log = logging.getLogger(__name__)

TICK_S = 1.0  # seconds between two decisions (examples/policy.yaml says so)


class CapacityEstimate:
    """The highest per-worker tokens/s seen at saturation (see the module docstring)."""

    def __init__(self) -> None:
        self.per_worker: float | None = None

    def observe(self, tokens_per_s: float, workers: int, waiting: int, window_fresh: bool) -> None:
        # A rate measured while nothing waited says what the load asked for, not what the workers
        # can give; one measured over a window spanning a change mixes two worker counts.
        if waiting <= 0 or not window_fresh or workers <= 0 or tokens_per_s <= 0:
            return
        rate = tokens_per_s / workers
        if self.per_worker is None or rate > self.per_worker:
            self.per_worker = rate


def change_running(controller: Controller) -> bool:
    """Whether a change of topology is running, whoever started it (Admin.Scale, the CLI or this
    autoscaler)."""
    return controller.changing()


class ServerSignals:
    """Builds the policy's `MetricsSnapshot` from a running server, once per tick."""

    def __init__(self, server: Server, policy: AutoscalePolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert server.controller is not None and server.controller.topology is not None, \
            "the autoscaler starts after the initial topology is committed"
        self.server = server
        self.policy = policy
        self.clock = clock
        self.capacity = CapacityEstimate()
        self._version = server.controller.topology.version
        self._changed_at = clock()  # serving start counts as a change

    def snapshot(self) -> MetricsSnapshot:
        s, controller, q = self.server, self.server.controller, self.policy.quantile
        assert controller is not None
        now = self.clock()
        scaling = change_running(controller)
        topology = controller.topology
        assert topology is not None
        if topology.version != self._version:
            # Seen one tick late at most, which only delays when the new window counts as fresh.
            self._version, self._changed_at = topology.version, now
        workers = len(topology.workers)
        running, waiting = s.engine.counts()
        stats = s.stats
        tokens_per_s = stats.tokens.rate(now)
        fresh = not scaling and now - self._changed_at > self.policy.window_s
        self.capacity.observe(tokens_per_s, workers, waiting, fresh)
        return MetricsSnapshot(
            now=now, workers=workers,
            ttft_q=stats.ttft.quantile(q, now), itl_q=stats.itl.quantile(q, now),
            # Both quantiles are judged on at least this many samples each.
            samples=min(stats.ttft.count(now), stats.itl.count(now)),
            waiting=waiting, running=running, tokens_per_s=tokens_per_s,
            capacity_tokens_per_s_per_worker=self.capacity.per_worker, scaling=scaling)


def start_autoscaler(server: Server, path: str, interval_s: float = TICK_S) -> AutoscaleRunner:
    """Load the policy at `path`, measure the server's windows over its `window_s`, and start
    ticking. The caller stops the returned runner (`Server.shutdown` does)."""
    from server.control import cluster  # ray only where the server already uses it

    policy = AutoscalePolicy.from_yaml(path)
    controller = server.controller
    assert controller is not None
    server.stats.set_window(policy.window_s)
    signals = ServerSignals(server, policy)

    def request_resources(n: int) -> None:
        cluster.request_resources(n, controller.resources)

    def on_decision(d: Decision) -> None:
        # The runner logs every reason itself (INFO when the target changes, DEBUG otherwise).
        server.metrics.autoscaler_target(d.target)

    runner = AutoscaleRunner(policy, signals.snapshot, scale=server.scale,
                             cluster_can_hold=controller.check_capacity,
                             request_resources=request_resources, interval_s=interval_s,
                             on_decision=on_decision)
    runner.start()
    log.info("autoscaler on %s: %d..%d workers, TTFT p%g <= %g s, ITL <= %g s over %g s, "
             "a decision every %g s", path, policy.min_workers, policy.max_workers,
             policy.quantile * 100, policy.ttft_slo_s, policy.itl_slo_s, policy.window_s, interval_s)
    return runner
