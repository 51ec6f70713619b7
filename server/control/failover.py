"""Replacing a lost worker: an ordinary change of topology, retried until it commits.

A worker is lost when the engine's exchange with it breaks (SIGKILL: on the engine's node its
process is seen exiting within milliseconds, experts/wire/ring.py; across nodes its socket closes)
or misses the per-exchange deadline (`--worker-timeout`: a hung, SIGSTOPped worker). The engine
then holds its running requests (they keep their KV cache) and the `Failover` here asks the
controller for a change that leaves the lost workers out, under a new version:

- **reroute**: every expert the lost workers held has a live replica: the new placement is the old
  one without them, and nothing moves (`reroute`).
- **remap**: otherwise the planner re-places their experts. On the lost worker's node its
  segments are still in `/dev/shm`, so a survivor or a warm standby there maps them (0 bytes
  copied); elsewhere a live replica is copied peer to peer; only an expert with no live copy
  left is read from the checkpoint (`sources_without`).

That change takes no new process (it uses survivors and standby workers only), so the stall is the
plan plus a remap, well under a second. A second change then brings the worker count back to the
operator's target (`Controller.restore`), while serving. That one starts a process, which takes a
core for a second or more: it waits until the engine has run its first step on the new topology
(the held streams' next tokens), or it would lengthen exactly the gap the failover keeps short.
Each change is retried with backoff until it commits; while one fails, the failure is visible
(`FailoverState`, the metrics).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Mapping, Protocol

from experts.placement.planner import Move, Placement, Plan

log = logging.getLogger(__name__)


def reroute(old: Placement, lost: Collection[str]) -> Plan | None:
    """The plan that only drops `lost` workers, if every expert they held has a live replica."""
    keep = [i for i, w in enumerate(old.workers) if w not in lost]
    if not keep:
        return None
    survivors = Placement(tuple(old.workers[i] for i in keep), tuple(old.experts[i] for i in keep))
    for layer in range(old.num_layers):
        held = {e for es in survivors.experts for e in es[layer]}
        if any(e not in held for w in lost if w in old.workers for e in old.held_by(w)[layer]):
            return None
    return Plan(survivors, (), ())


def sources_without(plan: Plan, old: Placement, lost: Collection[str], nodes: Mapping[str, str]) -> Plan:
    """`plan` with no move reading from a lost worker across nodes: a lost worker's segments can
    still be remapped on its own node, but it serves no peer copy. Such a move reads a live
    replica instead (on the receiver's node first), or the checkpoint when none is left."""
    moves = []
    for m in plan.moves:
        if m.src in lost and not m.same_node:
            live = [w for w in old.holders(m.layer, m.expert) if w not in lost]
            near = [w for w in live if nodes[w] == nodes[m.dst]]
            src = (near or live or [None])[0]
            m = Move(m.layer, m.expert, m.dst, src, src is not None and nodes[src] == nodes[m.dst])
        moves.append(m)
    # a lost worker releases nothing: its process is gone (its segments are reclaimed on its node)
    releases = tuple(r for r in plan.releases if r[0] not in lost)
    return Plan(plan.placement, tuple(moves), releases)


@dataclass(frozen=True)
class FailoverConfig:
    backoff_first_s: float = 0.05      # the first attempt runs at once; this is the first retry's wait
    backoff_max_s: float = 5.0
    lock_wait_s: float = 1.0           # a running change holds the lock: wait this long, then retry
    resume_wait_s: float = 2.0         # the restore waits at most this long for the engine's next step

    def __post_init__(self) -> None:
        if not 0 < self.backoff_first_s <= self.backoff_max_s:
            raise ValueError(f"backoff must satisfy 0 < first <= max, got {self.backoff_first_s}, "
                             f"{self.backoff_max_s}")
        if self.lock_wait_s <= 0:
            raise ValueError(f"lock_wait_s must be > 0, got {self.lock_wait_s}")
        if self.resume_wait_s < 0:
            raise ValueError(f"resume_wait_s must be >= 0, got {self.resume_wait_s}")


@dataclass(frozen=True)
class FailoverState:
    """What an operator sees while a loss is being handled."""
    lost: tuple[str, ...] = ()          # workers lost and not yet out of the serving topology
    restoring: bool = False             # the worker count is below the target after a loss
    attempts: int = 0                   # failed attempts since the last success
    last_error: str = ""

    @property
    def degraded(self) -> bool:
        return bool(self.lost) or self.restoring or self.attempts > 0


class Changes(Protocol):
    """What the failover asks of the controller."""

    def replace_lost(self, dead: Collection[str], timeout: float) -> object | None: ...
    def restore(self, timeout: float) -> object | None: ...
    def unresponsive(self, timeout: float) -> list[str]: ...


class Serving(Protocol):
    """What the failover reads of the engine (server/engine/loop.py's Engine)."""

    @property
    def steps(self) -> int: ...      # steps run so far
    @property
    def idle(self) -> bool: ...      # no request to run


class FailoverObserver(Protocol):
    def worker_lost(self, worker_id: str) -> None: ...
    def failover_committed(self, seconds: float, report: object) -> None: ...
    def failover_failed(self, error: str) -> None: ...
    def degraded(self, on: bool) -> None: ...


@dataclass
class _Pending:
    since: dict[str, float] = field(default_factory=dict)   # worker -> when its loss was reported


class Failover:
    """One thread that takes lost workers out of the topology and then restores the count."""

    def __init__(self, controller: Changes, observer: FailoverObserver, config: FailoverConfig = FailoverConfig(),
                 stopping: threading.Event | None = None, clock: Callable[[], float] = time.monotonic,
                 engine: Serving | None = None) -> None:
        self.controller = controller
        self.observer = observer
        self.config = config
        self.stopping = stopping or threading.Event()
        self.clock = clock
        self.engine = engine
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._restoring = False
        self._held_streams = False     # a take-out committed; the engine has not stepped on it yet
        self._state = FailoverState()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def lost(self, worker_id: str) -> None:
        """A worker is gone (called from the engine thread: returns at once)."""
        with self._lock:
            if worker_id in self._pending.since:
                return
            self._pending.since[worker_id] = self.clock()
            self._state = replace(self._state, lost=tuple(self._pending.since))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="failover", daemon=True)
                self._thread.start()
        self.observer.worker_lost(worker_id)
        self.observer.degraded(True)
        self._wake.set()

    def join(self, timeout: float) -> bool:
        """After `stopping` is set: wait for a change in flight to end (it may be starting a Ray
        actor; Ray must not be shut down under it). True when no failover thread is left."""
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def state(self) -> FailoverState:
        with self._lock:
            return self._state

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is pending (tests and the chaos bench use it)."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            if not self.state().degraded:
                return True
            time.sleep(0.02)
        return False

    def _run(self) -> None:
        backoff = self.config.backoff_first_s
        while not self.stopping.is_set():
            with self._lock:
                dead = dict(self._pending.since)
                restoring = self._restoring
            if not dead and not restoring:
                with self._lock:
                    if not self._pending.since:   # a loss reported meanwhile keeps the thread
                        self._thread = None
                        self._state = FailoverState()
                        break
                continue
            try:
                if dead:
                    self._take_out(dead)
                else:
                    if self._held_streams:
                        self._held_streams = False
                        if not self._engine_resumed():
                            continue   # another loss came first
                    report = self.controller.restore(self.config.lock_wait_s)
                    with self._lock:
                        self._restoring = False
                    if report is not None:
                        log.info("worker count restored after a loss")
                backoff = self.config.backoff_first_s
                with self._lock:
                    self._state = replace(self._state, attempts=0, last_error="", restoring=self._restoring,
                                          lost=tuple(self._pending.since))
            except Exception as exc:   # anything: the service must come back, so try again
                error = f"{type(exc).__name__}: {exc}"
                log.error("failover attempt failed (retrying in %.2fs): %s", backoff, error)
                with self._lock:
                    self._state = replace(self._state, attempts=self._state.attempts + 1, last_error=error)
                self.observer.failover_failed(error)
                self._wake.clear()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)
        self.observer.degraded(False)

    def _take_out(self, dead: dict[str, float]) -> None:
        try:
            report = self.controller.replace_lost(list(dead), self.config.lock_wait_s)
        except Exception:
            # a second worker may have died meanwhile (the change then fails on it): find it, so
            # the next attempt leaves it out too
            more = [w for w in self.controller.unresponsive(timeout=1.0) if w not in dead]
            if more:
                log.error("workers %s do not answer either: leaving them out too", more)
                now = self.clock()
                with self._lock:
                    for w in more:
                        self._pending.since.setdefault(w, now)
                for w in more:
                    self.observer.worker_lost(w)
            raise
        now = self.clock()
        with self._lock:
            for w in dead:
                self._pending.since.pop(w, None)
            self._restoring = True
        self._held_streams = report is not None
        if report is not None:
            seconds = now - min(dead.values())
            log.warning("failover: workers %s out of the topology %.3fs after the loss", sorted(dead), seconds)
            self.observer.failover_committed(seconds, report)

    def _engine_resumed(self) -> bool:
        """Wait until the engine has run a step since the take-out committed (or has nothing to
        run, or `resume_wait_s` passed). False when another loss is reported meanwhile."""
        engine = self.engine
        if engine is None:
            return True
        start, deadline = engine.steps, self.clock() + self.config.resume_wait_s
        while engine.steps <= start and not engine.idle and self.clock() < deadline:
            with self._lock:
                if self._pending.since:
                    return False
            if self.stopping.wait(0.005):
                return True
        return True
