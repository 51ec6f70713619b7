"""The thread that applies the autoscaling policy inside the server.

Every `interval_s` it takes a metrics snapshot, asks `decide` for a target and, when the target
differs from the committed worker count, either starts the change (`scale`) or, when the Ray
cluster cannot hold the target yet, asks Ray's autoscaler for the resources and reports the
target as pending; later ticks retry. It imports no ray: the server hands in the callables
(`server.control.cluster.request_resources` is the usual one).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Callable

from server.autoscale.policy import AutoscalePolicy, AutoscalerState, Decision, MetricsSnapshot, decide


class AutoscaleRunner:
    """Runs `decide` on a daemon thread and applies its decisions.

    `cluster_can_hold(n)` returns None when n workers fit in the Ray cluster now, else a message
    naming what is missing. `scale(n)` starts (or runs) a change of topology; its exceptions are
    logged and the next tick carries on. `on_decision` sees every decision, after the runner has
    marked it pending or not.

    Serving start counts as a change: no downscale is judged before a full window of metrics
    (and `cooldown_down_s`) has been measured on the topology the server started with.
    """

    def __init__(self, policy: AutoscalePolicy, snapshot: Callable[[], MetricsSnapshot],
                 scale: Callable[[int], object], cluster_can_hold: Callable[[int], str | None],
                 request_resources: Callable[[int], None] | None = None, interval_s: float = 1.0,
                 on_decision: Callable[[Decision], None] | None = None,
                 log: logging.Logger | None = None,
                 initial_state: AutoscalerState | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.policy = policy
        self.interval_s = interval_s
        self._snapshot = snapshot
        self._scale = scale
        self._cluster_can_hold = cluster_can_hold
        self._request_resources = request_resources
        self._on_decision = on_decision
        self._log = log or logging.getLogger(__name__)
        # Until the first tick the committed count is unknown; the first tick replaces this
        # placeholder unless the caller gave a state.
        self._primed = initial_state is not None
        self.state: AutoscalerState = initial_state or AutoscalerState(target=policy.min_workers)
        self.last_decision: Decision | None = None
        self._requested: int | None = None  # workers covered by Ray's standing request
        self._tick_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("autoscaler runner already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="elasticmoe-autoscaler",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop ticking and join the thread: at once between ticks; a tick in progress (a
        blocking `scale`) is waited for up to `timeout_s` (None: until it ends)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._log.warning("autoscaler: thread still inside a tick after %s s", timeout_s)

    def step(self) -> Decision:
        """One tick: snapshot, decide, apply. Called by the thread, or directly by tests."""
        with self._tick_lock:
            snap = self._snapshot()
            if not self._primed:
                self.state = AutoscalerState(target=snap.workers, last_down=snap.now)
                self._primed = True
            previous = self.state
            decision = decide(self.policy, snap, previous)
            if not snap.scaling:
                decision = self._apply(snap, decision, was_pending=previous.pending)
            changed = (decision.target != previous.target
                       or decision.state.pending != previous.pending)
            (self._log.info if changed else self._log.debug)("autoscaler: %s", decision.reason)
            self.state = decision.state
            self.last_decision = decision
        if self._on_decision is not None:
            try:
                self._on_decision(decision)
            except Exception:
                self._log.exception("autoscaler: on_decision failed")
        return decision

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                self._log.exception("autoscaler: tick failed; retrying in %g s", self.interval_s)
            self._stop.wait(self.interval_s)

    def _apply(self, snap: MetricsSnapshot, decision: Decision, was_pending: bool) -> Decision:
        target = decision.target
        if target == snap.workers:
            self._lower_request(target)  # e.g. a pending upscale was dropped
            return decision
        missing = self._cluster_can_hold(target)
        if missing is not None:
            asked = self._raise_request(target)
            reason = (f"{decision.reason}; pending: the Ray cluster cannot hold {target} "
                      f"workers now ({missing}); {asked}")
            return Decision(target, reason, replace(decision.state, pending=True))
        reason = decision.reason
        if was_pending:
            reason = (f"scale {snap.workers} -> {target}: the Ray cluster can hold it now "
                      f"({decision.reason})")
        try:
            self._scale(target)
        except Exception as e:
            # The next tick sees the unchanged worker count and decides again after the cooldown.
            self._log.exception("autoscaler: scale to %d workers failed", target)
            reason += f"; scale failed: {type(e).__name__}: {e}"
        self._lower_request(target)
        return Decision(target, reason, replace(decision.state, pending=False))

    def _raise_request(self, target: int) -> str:
        if self._request_resources is None:
            return "no request_resources given: waiting for the cluster to grow"
        if self._requested == target:
            return f"asked Ray's autoscaler for {target} workers' resources earlier"
        try:
            self._request_resources(target)
        except Exception as e:
            self._log.exception("autoscaler: request_resources(%d) failed", target)
            return f"asking Ray's autoscaler failed ({type(e).__name__}: {e}); retrying"
        self._requested = target
        return f"asked Ray's autoscaler for {target} workers' resources"

    def _lower_request(self, target: int) -> None:
        """A standing request above the target would keep nodes the server no longer uses."""
        if self._request_resources is None or self._requested is None \
                or target >= self._requested:
            return
        try:
            self._request_resources(target)
            self._requested = target
        except Exception:
            self._log.exception("autoscaler: lowering request_resources to %d failed", target)
