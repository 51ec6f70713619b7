"""How many threads a kernel call gets: the CPUs a process may run on, shared by whoever computes
at the same time.

On a CPU node the engine and its node's workers take turns on the same cores (the engine's
attention, then the workers' experts, layer after layer), so the workers busy with one layer
share the node's CPUs between them: `team` of them each take `cpus // team` threads. One busy
worker takes every CPU; two take half each; none ever runs more threads than its CPUs. Ray's
CPU grant places an actor on a node; it cannot say that an engine and a worker alternate on the
same cores, so the grant does not size the team's threads. A server that must leave CPUs to
other tenants of the node runs in an affinity mask (taskset, a cgroup cpuset): that is what
`available_cpus` reads.

OpenMP's thread count is a property of the calling thread (once a thread has run torch, another
thread's setting no longer reaches it), so `KernelThreads` sets it on the thread that calls the
kernel, and only when it changes there (`torch.set_num_threads` costs a few
microseconds; a layer costs hundreds).
"""
from __future__ import annotations

import os
import threading


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share, not
    the machine's count)."""
    return len(os.sched_getaffinity(0))


def team_threads(cpus: int, team: int) -> int:
    """Threads for one of `team` workers computing at once on `cpus` CPUs: an equal share, at
    least one."""
    return max(1, cpus // max(1, team))


class _Current(threading.local):
    threads = 0     # what this OS thread last set (0: not yet)


class KernelThreads:
    """The thread count of the kernels one worker runs: `fixed` when set, else its share of `cpus`
    for the team of the request at hand."""

    def __init__(self, cpus: int, fixed: int = 0) -> None:
        self.cpus = cpus
        self.fixed = fixed
        self._current = _Current()

    def for_team(self, team: int) -> int:
        return self.fixed or team_threads(self.cpus, team)

    def use(self, team: int) -> int:
        """Set the calling thread's OpenMP thread count for a request of `team`; returns it."""
        import torch

        n = self.for_team(team)
        if self._current.threads != n:
            torch.set_num_threads(n)
            self._current.threads = n
        return n
