"""The controller: sole owner of the topology. Every change (scale up, scale down, rebalance) runs
the same four steps under one lock:

1. plan     — experts/placement/planner.py, a pure function: current placement -> new placement + moves.
2. prepare  — while the old topology serves: start (or take standby) workers, each receiver
              reserves slots and gets its experts (remap on one node, peer copy across nodes,
              disk only when no live copy exists). Nothing the old topology uses is touched.
              Any failure aborts: what was added is undone and the old topology serves on.
3. commit   — the engine swaps to the new version between two steps.
4. release  — slots and workers the new version does not use are freed.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection

import ray

from experts.wire.config import WireConfig
from experts.wire.dataplane import ExchangeLink, open_link
from experts.wire.ring import RingLink
from experts.placement.planner import Placement, Plan, plan_placement
from experts.model.dtypes import TORCH_DTYPES
from experts.model.spec import ModelSpec
from experts.worker.actor import ReceiveResult, WorkerInfo
from server.control import cluster
from server.control.cluster import WorkerResources
from server.engine.exchange import RemoteExperts, Routing
from server.control.failover import reroute, sources_without
from server.control.receive import receive_all
from server.control.sweeper import Sweepers
from server.control.warmup import warm_up
from server.control.topology import ChangeReport, ScaleRejected, Topology

log = logging.getLogger(__name__)


def _no_phase(phase: str) -> None:
    """A change nobody follows (the replacement of a lost worker reports no phases)."""


@dataclass
class _Live:
    handle: object
    info: WorkerInfo


class Controller:
    def __init__(self, spec: ModelSpec, model_dir: str, namespace: str, engine_commit: Callable[[RemoteExperts], None],
                 resources: WorkerResources = WorkerResources(), slots_per_worker: int = 0,
                 standby: int = 0, prepare_timeout: float = 300.0,
                 expert_load: Callable[[], list[list[float]] | None] = lambda: None,
                 replicate_hot: bool = False, worker_timeout: float = 60.0, redundant_experts: int = 0, wire: WireConfig | None = None,
                 share_node: bool = False, node_lead: bool = False) -> None:
        self.spec = spec
        self.model_dir = model_dir
        self.namespace = namespace
        self.engine_commit = engine_commit
        self.resources = resources
        self.slots = slots_per_worker or spec.num_experts
        self.standby_target = standby
        self.prepare_timeout = prepare_timeout
        self.expert_load = expert_load
        self.replicate_hot = replicate_hot
        self.worker_timeout = worker_timeout   # per exchange: a worker silent this long is lost
        self.redundant_experts = redundant_experts   # replicas per layer kept whatever the load (reroute on loss)
        self.share_node = share_node           # every worker holds its node's experts (experts/placement/share.py)
        self.node_lead = share_node and node_lead   # ... and the first of them computes (server/engine/exchange.py)
        self.wire = wire or WireConfig.generate()   # the per-server secret, handed to each worker it starts
        self.target_workers = 0                # the count the operator asked for last (a loss restores it)
        self.sweepers = Sweepers(namespace)
        self._swept_nodes: set[str] = set()
        self.topology: Topology | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._live: dict[str, _Live] = {}
        self._standby: list[_Live] = []
        self._standby_lock = threading.Lock()
        self._standby_starting = 0
        self._links: dict[str, ExchangeLink] = {}
        self._asking = threading.Lock()   # a metrics scrape asking the workers; shutdown waits for it

    # -- workers --------------------------------------------------------------------------
    def _start_workers(self, count: int, use_standby: bool = True) -> list[_Live]:
        """Take warm standby workers first, then start new ones and wait until they answer."""
        taken: list[_Live] = []
        if use_standby:
            with self._standby_lock:
                taken, self._standby = self._standby[:count], self._standby[count:]
        ids = [f"w{next(self._ids)}" for _ in range(count - len(taken))]
        handles = [cluster.start_worker(i, self.namespace, self.model_dir, self.spec, self.slots,
                                        self.resources, self.wire) for i in ids]
        try:
            infos = cluster.info_of(handles, timeout=self.prepare_timeout)
        except Exception:
            for h in handles:
                ray.kill(h)
            with self._standby_lock:
                self._standby = taken + self._standby
            raise
        return taken + [_Live(h, i) for h, i in zip(handles, infos)]

    def fill_standby(self) -> None:
        """Start workers until `standby` warm ones wait (runs beside serving, off the change lock)."""
        with self._standby_lock:
            missing = self.standby_target - len(self._standby) - self._standby_starting
            self._standby_starting += max(0, missing)
        if missing <= 0:
            return
        try:
            fresh = self._start_workers(missing, use_standby=False)
        finally:
            with self._standby_lock:
                self._standby_starting -= missing
        with self._standby_lock:
            self._standby.extend(fresh)
        log.info("%d standby workers ready", len(self._standby))

    def standby_count(self) -> int:
        with self._standby_lock:
            return len(self._standby)

    def changing(self) -> bool:
        """Whether a change of topology is running now."""
        return self._lock.locked()

    def check_capacity(self, num_workers: int) -> str | None:
        current = len(self._live)
        extra = max(0, num_workers - current - len(self._standby))
        return self.resources.missing_for(extra, cluster.available()) if extra else None

    # -- one change -----------------------------------------------------------------------
    def scale(self, num_workers: int, on_phase: Callable[[str], None] = _no_phase) -> ChangeReport:
        """`on_phase` hears planned, preparing, committing, releasing (server/control/operations.py)."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not self._lock.acquire(blocking=False):
            raise ScaleRejected("a change of topology is already running")
        try:
            missing = self.check_capacity(num_workers)
            if missing:
                raise ScaleRejected(missing)
            on_phase("planned")
            report = self._change(num_workers, on_phase)
            self.target_workers = num_workers
            return report
        finally:
            self._lock.release()

    def rebalance(self, load: list[list[float]], on_phase: Callable[[str], None] = _no_phase) -> ChangeReport:
        """Re-place experts by `load` ([L][E] tokens, e.g. of a recent window) on the same workers:
        an ordinary change with a new version; on one node every move is a remap."""
        if not self._lock.acquire(blocking=False):
            raise ScaleRejected("a change of topology is already running")
        try:
            if self.topology is None:
                raise ScaleRejected("no topology to rebalance yet")
            on_phase("planned")
            return self._change(len(self.topology.workers), on_phase, load)
        finally:
            self._lock.release()

    def removable(self, topology: Topology | None = None) -> list[str]:
        """Workers a scale-down of `topology` (default: the committed one) removes, in its order:
        a scale to n keeps the first n (`_change`)."""
        topo = topology or self.topology
        return list(topo.placement.workers[:0:-1]) if topo else []

    def _change(self, num_workers: int, on_phase: Callable[[str], None] = _no_phase,
                load: list[list[float]] | None = None, lost: frozenset[str] = frozenset()) -> ChangeReport:
        on_phase("preparing")
        t0 = time.perf_counter()
        old = self.topology
        # a lost worker is no receiver and no peer source, but its segments can still be remapped
        current_ids = [w for w in old.workers if w not in lost] if old else []
        direction = "up" if num_workers > len(current_ids) else "down" if num_workers < len(current_ids) else "rebalance"
        parts: dict[str, float] = {}
        joining = self._start_workers(max(0, num_workers - len(current_ids)))
        parts["start"] = time.perf_counter() - t0
        target = current_ids[:num_workers] + [j.info.worker_id for j in joining]
        infos = (dict(old.workers) if old else {}) | {j.info.worker_id: j.info for j in joining}
        self._sweep_new_nodes({i.node_id for i in infos.values()})
        t1 = time.perf_counter()
        nodes = {w: i.node_id for w, i in infos.items()}
        plan = reroute(old.placement, lost) if lost and not joining else None
        if plan is None:
            plan = plan_placement(old.placement if old else None, target, nodes,
                                  len(self.spec.moe_layers), self.spec.num_experts, self.slots,
                                  load=self.expert_load() if load is None else load, replicate_hot=self.replicate_hot,
                                  redundant=self.redundant_experts, share_node=self.share_node)
            if lost:
                plan = sources_without(plan, old.placement, lost, nodes)
        parts["plan"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        handles = {w: self._live[w].handle for w in current_ids} | {j.info.worker_id: j.handle for j in joining}
        results = self._prepare(plan, old, infos, handles, joining)
        parts["transfer"] = time.perf_counter() - t2
        segments = dict(old.segments) if old else {}
        for res in results:
            for (layer, expert), name in res.segments.items():
                segments[(res.worker_id, layer, expert)] = name
        new = Topology((old.version if old else 0) + 1, plan.placement, {w: infos[w] for w in target}, {
            k: v for k, v in segments.items() if k[0] in target and k[2] in plan.placement.held_by(k[0])[k[1]]})
        t3 = time.perf_counter()
        for j in joining:
            self._live[j.info.worker_id] = j
        on_phase("committing")
        warnings: list[str] = []
        try:
            self.engine_commit(self._backend(new))
        except Exception as exc:
            # the new version waits in the engine's inbox and is taken at its next turn (a step
            # stuck on a hung worker ends at --worker-timeout): it is the topology either way, so
            # GetTopology keeps saying what the engine serves
            warnings.append(f"the engine was slow to take v{new.version}: {exc}")
            log.warning("topology v%d committed; %s", new.version, warnings[-1])
        self.topology = new
        parts["commit"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        on_phase("releasing")
        try:   # committed: whatever fails from here on is a warning, never an abort
            self._release(plan, segments, new, [w for w in current_ids if w not in target])
        except Exception as exc:
            warnings.append(f"release after commit of v{new.version} failed: {exc}")
            log.warning("topology v%d committed; %s", new.version, warnings[-1])
        if lost:
            self._reclaim_lost(old, new, lost)
        parts["release"] = time.perf_counter() - t4
        report = ChangeReport(direction, new, time.perf_counter() - t0, parts,
                              sum(r.bytes_remapped for r in results), sum(r.bytes_copied for r in results),
                              sum(r.bytes_loaded for r in results), self._count_moves(plan), warnings)
        log.info("topology v%d committed: %s to %d workers in %.2fs (%s); remapped %d B, copied %d B, loaded %d B",
                 new.version, direction, num_workers, report.seconds,
                 ", ".join(f"{k} {v:.3f}s" for k, v in parts.items()), report.bytes_remapped,
                 report.bytes_copied, report.bytes_loaded)
        return report

    def replace_lost(self, dead: Collection[str], timeout: float = 60.0) -> ChangeReport | None:
        """Workers died while serving: an ordinary change (new version) without them. It starts no
        process, so the engine's stall is short: their experts are rerouted to live replicas, or
        remapped from the segments they left on their node into survivors or warm standby workers,
        copied from a live copy elsewhere, and read from the checkpoint only where no copy is left.
        Returns None when none of `dead` serves any more. `restore` brings the count back after."""
        if not self._lock.acquire(timeout=timeout):
            raise ScaleRejected(f"workers {sorted(dead)} lost, but a change of topology did not finish in {timeout}s")
        try:
            old = self.topology
            lost = frozenset(w for w in dead if old is not None and w in old.workers)
            if not lost:
                return None
            for w in lost:
                self._forget(w)
            survivors = len(old.workers) - len(lost)
            # survivors only when their slots hold every expert: they are warm, so the stall is
            # the remap; else the lost count again (standby workers first, then new processes)
            count = survivors if survivors and survivors * self.slots >= self.spec.num_experts else len(old.workers)
            log.warning("workers %s lost: topology v%d without them on %d workers", sorted(lost), old.version, count)
            return self._change(count, lost=lost)
        finally:
            self._lock.release()

    def restore(self, timeout: float = 60.0) -> ChangeReport | None:
        """After a loss: scale back to the operator's worker count (None if it is there already)."""
        if not self._lock.acquire(timeout=timeout):
            raise ScaleRejected(f"a change of topology did not finish in {timeout}s")
        try:
            if self.topology is None or len(self.topology.workers) >= self.target_workers:
                return None
            missing = self.check_capacity(self.target_workers)
            if missing:
                raise ScaleRejected(missing)
            return self._change(self.target_workers)
        finally:
            self._lock.release()

    def unresponsive(self, timeout: float = 1.0) -> list[str]:
        """Serving workers that do not answer a control call within `timeout` seconds."""
        topo = self.topology
        if topo is None:
            return []
        refs = {w: self._live[w].handle.info.remote() for w in topo.workers if w in self._live}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        answered = set()
        for w, ref in refs.items():
            if ref in ready:
                try:
                    ray.get(ref, timeout=0)
                    answered.add(w)
                except Exception:
                    pass
        return [w for w in topo.workers if w not in answered]

    def refused_connections(self, timeout: float = 1.0) -> dict[tuple[str, str], int]:
        """(worker, listener) -> connections its internal ports refused so far, from the `stats`
        of every live and standby worker that answers within `timeout` (a metrics scrape asks)."""
        with self._asking:
            handles = {w: live.handle for w, live in list(self._live.items())}
            handles |= {live.info.worker_id: live.handle for live in list(self._standby)}
            if not handles:
                return {}
            refs = {w: h.stats.remote() for w, h in handles.items()}
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
            out: dict[tuple[str, str], int] = {}
            for w, ref in refs.items():
                if ref in ready:
                    try:
                        refused = ray.get(ref, timeout=0)["refused"]
                    except Exception:   # gone since: its series ends with it
                        continue
                    out |= {(w, listener): n for listener, n in refused.items()}
            return out

    def _forget(self, worker: str) -> None:
        """Drop a lost worker's link and process (SIGKILL: a hung one may never answer `stop`)."""
        link = self._links.pop(worker, None)
        if link:
            link.close()
        live = self._live.pop(worker, None)
        if live is not None:
            try:
                ray.kill(live.handle)
            except Exception:   # already gone
                pass

    def _reclaim_lost(self, old: Topology, new: Topology, lost: frozenset[str]) -> None:
        """Remove, on each lost worker's node, its segments that the new version does not map.
        Off the change's path: the engine already serves the new version."""
        keep = set(new.segments.values())
        jobs = [(old.workers[w].node_id, w) for w in lost]

        def run() -> None:
            for node, w in jobs:
                try:
                    self.sweepers.reclaim(node, w, keep)
                except Exception as exc:
                    log.error("%s", exc)
        threading.Thread(target=run, name="reclaim", daemon=True).start()

    def _sweep_new_nodes(self, nodes: set[str]) -> None:
        """On a node first used, remove the segments of servers that are gone (memory/owners.py)."""
        fresh = nodes - self._swept_nodes - {cluster.this_node()}   # the server swept its own at start
        self._swept_nodes |= fresh

        def run() -> None:
            for node in fresh:
                try:
                    self.sweepers.sweep_orphans(node)
                except Exception as exc:
                    log.warning("sweeping node %s failed: %s", node[:12], exc)
        if fresh:
            threading.Thread(target=run, name="sweep", daemon=True).start()

    def _prepare(self, plan: Plan, old: Topology | None, infos: dict[str, WorkerInfo], handles: dict,
                 joining: list[_Live]) -> list[ReceiveResult]:
        # moves from a live copy or the disk first, then remaps of what a node-mate just read
        results, failure = receive_all(plan, old.segments if old else {}, infos, handles, self.prepare_timeout)
        if failure is None:
            try:
                # a worker on the engine's node gets a shared-memory ring, others TCP
                def link(j: _Live, timeout: float) -> ExchangeLink:
                    opened = open_link(j.info.worker_id, j.info.data_address, self.wire.secret,
                                       j.info.node_id == cluster.this_node(), timeout=timeout)
                    if isinstance(opened, RingLink):   # same node: its exit is seen before its socket closes
                        opened.follow(j.info.pid)
                    return opened
                warm_up({j.info.worker_id: link(j, self.prepare_timeout) for j in joining},
                        plan.placement.held_by, len(self.spec.moe_layers), self.spec.hidden,
                        TORCH_DTYPES[self.spec.dtype])
                for j in joining:
                    self._links[j.info.worker_id] = link(j, self.worker_timeout)
            except Exception as exc:
                failure = RuntimeError(f"cannot open the data plane to a new worker: {exc}")
        if failure is not None:
            self._abort(results, handles, joining)
            raise failure
        return results

    def _abort(self, results: list[ReceiveResult], handles: dict, joining: list[_Live]) -> None:
        """Undo a prepare: drop what receivers got, stop the workers started for it."""
        joined = {j.info.worker_id for j in joining}
        for res in results:
            if res.worker_id in joined:
                continue
            items = list(res.segments)
            created = [f"-{res.worker_id}-" in name for name in res.segments.values()]
            try:
                ray.get(handles[res.worker_id].release.remote(items, created), timeout=60)
            except Exception as exc:
                log.error("abort: worker %s could not release %d experts: %s", res.worker_id, len(items), exc)
        for j in joining:
            link = self._links.pop(j.info.worker_id, None)
            if link:
                link.close()
            self._stop(j)
        log.warning("change of topology aborted; the old topology serves on")

    @staticmethod
    def _count_moves(plan: Plan) -> dict[str, int]:
        counts = {"remap": 0, "peer": 0, "disk": 0}
        for m in plan.moves:
            counts["disk" if m.src is None else "remap" if m.same_node else "peer"] += 1
        return counts

    def _routing(self, topo: Topology) -> Routing:
        p = topo.placement
        return Routing.build(topo.version, p.workers, [p.held_by(w) for w in p.workers],
                             len(self.spec.moe_layers), self.spec.num_experts,
                             [topo.workers[w].node_id for w in p.workers], self.node_lead)

    def computing(self, topo: Topology) -> set[str]:
        """The workers of `topo` the engine sends work to (the others stand by for a node-mate)."""
        routing = self._routing(topo)
        return {routing.workers[i] for i in routing.serving}

    def _backend(self, topo: Topology) -> RemoteExperts:
        return RemoteExperts(self._routing(topo), self._links, self.spec.moe_index, self.spec.hidden)

    def _release(self, plan: Plan, segments: dict[tuple[str, int, int], str], new: Topology,
                 leaving: list[str]) -> None:
        """Free what the committed version does not use. A segment's name is unlinked by the last
        worker on its node to let go of it (a remapping peer may outlive the worker that made it)."""
        in_use = set(new.segments.values())
        by_worker: dict[str, list[tuple[int, int]]] = {}
        for w, layer, expert in plan.releases:
            by_worker.setdefault(w, []).append((layer, expert))
        for w in leaving:   # everything a leaving worker holds goes, whatever the plan listed
            by_worker[w] = [(l, e) for (ww, l, e) in segments if ww == w]
        refs = [self._live[w].handle.release.remote(items, [segments[(w, l, e)] not in in_use for l, e in items])
                for w, items in by_worker.items() if items]
        ray.get(refs, timeout=120)
        for w in leaving:
            live = self._live.pop(w)
            link = self._links.pop(w, None)
            if link:
                link.close()
            with self._standby_lock:
                keep = len(self._standby) < self.standby_target
                if keep:
                    self._standby.append(live)   # empty now: a warm worker for the next scale-up
            if not keep:
                self._stop(live)

    def _stop(self, live: _Live, unlink_held: bool = False) -> None:
        try:
            ray.get(live.handle.stop.remote(unlink_held), timeout=30)
        except Exception:
            pass
        ray.kill(live.handle)

    def shutdown(self, wait_s: float = 60.0) -> None:
        # a change in flight (Admin.Scale, a rebalance) holds the lock while it starts actors and
        # moves experts: let it end before its workers and then Ray go away under it
        held = self._lock.acquire(timeout=wait_s)
        if not held:
            log.warning("a change is still running after %.0fs; stopping the workers under it", wait_s)
        try:
            for live in list(self._live.values()) + self._standby:
                self._stop(live, unlink_held=True)
            self.sweepers.shutdown()
            for link in self._links.values():
                link.close()
            self._live.clear()
            self._standby.clear()
        finally:
            if held:
                self._lock.release()
        self._links.clear()
        with self._asking:   # a scrape that was asking the workers has finished: Ray may go
            pass
