"""The engine process's CPU threads.

Engine and workers take turns on the same cores (engine: attention, norms, router, LM head;
workers: experts), so in its phases the engine uses every CPU it may run on, and between them its
OpenMP threads must sleep rather than spin: a spinning thread holds a core a worker needs.
libgomp reads its wait policy once, when torch loads it, hence `passive_openmp` must run before
the first `import torch` of the process (the CLI calls it first thing); the thread count can be set
at any time (`engine_threads`).
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def passive_openmp() -> bool:
    """Ask OpenMP to sleep, not spin, when idle (unless the user chose a policy). False when torch
    is loaded already and the policy can no longer change in this process."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share, not
    the machine's count)."""
    return len(os.sched_getaffinity(0))


def engine_threads(requested: int = 0) -> int:
    """Set torch's (and so OpenMP's) thread count for the engine's ops: `requested`, or with 0
    every CPU the process may run on. Returns the count set."""
    import torch

    n = requested or available_cpus()
    torch.set_num_threads(n)
    log.info("engine: %d torch threads, OMP_WAIT_POLICY=%s", n, os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"))
    return n
