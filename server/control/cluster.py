"""Ray: joining or starting a cluster, starting expert worker actors, and what the cluster can hold."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import ray

from experts.model.spec import ModelSpec
from experts.wire.config import WireConfig
from experts.worker.actor import ExpertWorker, WorkerInfo

log = logging.getLogger(__name__)
START_ATTEMPTS = 3


@dataclass(frozen=True)
class WorkerResources:
    cpus: float = 0.5
    gpus: float = 0.0

    def missing_for(self, count: int, available: dict[str, float]) -> str | None:
        """None when `count` more workers fit in `available`, else what is missing."""
        need = {"CPU": self.cpus * count, "GPU": self.gpus * count}
        short = [f"{need[k] - available.get(k, 0.0):g} {k}" for k in need
                 if need[k] > 0 and available.get(k, 0.0) + 1e-9 < need[k]]
        if not short:
            return None
        have = ", ".join(f"{available.get(k, 0.0):g} {k}" for k in need if need[k] > 0)
        return f"{count} more workers need {self.cpus * count:g} CPU/{self.gpus * count:g} GPU; " \
               f"the Ray cluster has {have} free; missing {' and '.join(short)}"


def connect(address: str | None, num_cpus: int | None = None, node_ip: str = "127.0.0.1") -> bool:
    """Join the cluster at `address`, or start an embedded one. Returns True if we started it."""
    if ray.is_initialized():
        return False
    # One BLAS thread per process (workers also pin torch's own count). Set in our environment,
    # which the embedded raylet passes on, rather than as a runtime_env: a job-level runtime_env
    # stops Ray from handing a new actor one of its prestarted worker processes, which costs a
    # scale-up a whole Python start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # the default only: workers set theirs from Ray's CPU grant
    # Workers and engine take turns on the cores: an idle OpenMP thread must sleep, not spin (one
    # MoE layer every 3 ms on a loaded 2-core machine: 0.7 s CPU passive against 6 s spinning)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Ray starts worker processes at niceness 15. That suits the start of a new expert worker (its
    # Python and torch imports then yield the CPU to the streams being served), but once serving,
    # a worker is on every step's critical path: it raises itself back to 0 at the end of its
    # start (experts/worker/actor.py). Without the privilege to do so, start workers at 0 instead.
    if os.geteuid() != 0:
        os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return False
    # address="local": always a new embedded cluster, never one another process left running here.
    # A raylet that misses Ray's start-up deadline on a loaded machine is worth a second try.
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 1, 2), include_dashboard=False,
                     _node_ip_address=node_ip, logging_level=logging.WARNING, log_to_driver=False)
            break
        except Exception as exc:
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"the embedded Ray did not start after {attempt} attempts: {exc}") from exc
            log.warning("the embedded Ray did not start (%s); trying again", exc)
            ray.shutdown()
            time.sleep(2.0)
    return True


@ray.remote
class _RayWorker(ExpertWorker):
    """ExpertWorker as an actor; binds its sockets on the address the server was told (loopback
    unless it spans nodes, then its Ray node's address)."""

    def __init__(self, worker_id: str, namespace: str, model_dir: str, spec: ModelSpec, capacity: int,
                 wire: WireConfig) -> None:
        super().__init__(worker_id, namespace, model_dir, spec, host=wire.bind_host or ray.util.get_node_ip_address(),
                         node_id=ray.get_runtime_context().get_node_id(), capacity=capacity, wire=wire)


def start_worker(worker_id: str, namespace: str, model_dir: str, spec: ModelSpec, capacity: int,
                 resources: WorkerResources, wire: WireConfig) -> "ray.actor.ActorHandle":
    """Start one worker actor (asynchronously: call `info` to wait for it)."""
    return _RayWorker.options(
        name=f"{namespace}-{worker_id}",
        num_cpus=resources.cpus,
        num_gpus=resources.gpus,
        max_concurrency=4,          # control calls run beside each other; the data plane has its own threads
        scheduling_strategy="SPREAD",
        max_restarts=0,
    ).remote(worker_id, namespace, model_dir, spec, capacity, wire)


def this_node() -> str:
    """The Ray node id of this process (the engine's, in the driver)."""
    return ray.get_runtime_context().get_node_id()


def available() -> dict[str, float]:
    return {k: float(v) for k, v in ray.available_resources().items()}


def request_resources(num_workers: int, resources: WorkerResources) -> None:
    """Ask Ray's autoscaler for enough nodes to place `num_workers` workers."""
    from ray.autoscaler.sdk import request_resources as ask

    bundle = {"CPU": resources.cpus} | ({"GPU": resources.gpus} if resources.gpus else {})
    ask(bundles=[bundle] * num_workers)


def info_of(handles: list, timeout: float) -> list[WorkerInfo]:
    return ray.get([h.info.remote() for h in handles], timeout=timeout)
