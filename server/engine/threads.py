"""The engine process's CPU threads.

Engine and workers take turns on the same cores (engine: attention, norms, router, LM head;
workers: experts), so in its phases the engine uses the CPUs it may run on but one, and between
them its OpenMP threads must sleep rather than spin: a spinning thread holds a core a worker needs.
The one CPU left out is for everything that is not a kernel (the API's event loops, tokenizers,
Ray's daemons, the OS), as vLLM reserves one (VLLM_CPU_NUM_OF_RESERVED_CPU): an OpenMP region
whose threads fill every core stalls at its barrier whenever any other thread runs, for as long
as the scheduler lets that thread run. Measured in the server on 2 cores (2 workers, fp32, A/B
alternating, two rounds): 1 engine thread against 2 gave 79 vs 41 tok/s at batch 1 and 725 vs 470
at batch 32, the engine's attention phase 2.1-2.4 vs 5.7 ms per step at batch 1 (isolated, with
nothing else running, 2 threads win). A wide step (at least WIDE_STEP_TOKENS tokens: prefill
chunks, decode at batch 16 and up) has ops large enough to pay for the stalls, so it takes every
CPU (`StepThreads`): 4 x 512-token prefill +25% prompt tok/s, its attention 34-37 vs 60 ms (A/B,
2 cores); decode at batch 32 with one worker per node computing: 1037/1039 vs 1016/1014 tok/s,
attention 5.9-6.1 vs 6.9-7.2 ms per step (A/B, 2 rounds; batch 8 unchanged); the threshold at
16 rather than 32 (3 rounds, fp32, 2 workers): batch 16 528/672/544 vs 500/594/506 tok/s, batch 8
level (335/340/377 vs 328/392/297); at 8 batch 16 gained in 2 rounds of 3 only.
libgomp reads its wait policy once, when torch loads it, hence `passive_openmp` must run before
the first `import torch` of the process (the CLI calls it first thing); the thread count can be set
at any time (`engine_threads`).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from experts.kernels.threads import available_cpus

log = logging.getLogger(__name__)


# libgomp's idle threads spin this many rounds (tens of microseconds) before they sleep: long
# enough to bridge the gaps between one op's parallel region and the next inside a phase, far
# shorter than a phase of the workers (milliseconds). libgomp's default, 300000 rounds, spins
# through the whole expert phase on a core a worker needs; 0 (pure passive) pays a futex wake-up
# per op. Measured on 2 cores, batch 32, engine phases per step: 8.2 ms spinning, 13.8 ms at 0,
# 9.4 ms at 2000.
SPIN_ROUNDS = "2000"


def passive_openmp() -> bool:
    """Ask OpenMP to sleep after a short bounded spin when idle (unless the user chose a policy).
    False when torch is loaded already and the policy can no longer change in this process."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_ROUNDS)
    return "torch" not in sys.modules


RESERVED_CPUS = 1


def auto_threads(cpus: int, reserved: int = RESERVED_CPUS) -> int:
    """The engine's thread count when none is asked for: `cpus` but `reserved`, at least one."""
    return max(1, cpus - reserved)


def engine_threads(requested: int = 0, reserved: int = RESERVED_CPUS) -> int:
    """Set torch's (and so OpenMP's) thread count for the engine's ops: `requested`, or with 0
    the CPUs the process may run on but `reserved`. Returns the count set."""
    import torch

    n = requested or auto_threads(available_cpus(), reserved)
    torch.set_num_threads(n)
    log.info("engine: %d torch threads, OMP_WAIT_POLICY=%s", n, os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"))
    return n


WIDE_STEP_TOKENS = 16


@dataclass(frozen=True)
class StepThreads:
    """The engine's thread count per step: `narrow` for decode-sized steps, `wide` for steps of at
    least WIDE_STEP_TOKENS tokens."""
    narrow: int
    wide: int

    def for_tokens(self, tokens: int) -> int:
        return self.wide if tokens >= WIDE_STEP_TOKENS else self.narrow


def step_threads(requested: int = 0) -> StepThreads:
    """Set the engine's threads (`engine_threads`) and say how many each step takes: what was
    asked for every step when `requested`, else the CPUs but one, and every CPU for wide steps."""
    n = engine_threads(requested)
    return StepThreads(n, n if requested else available_cpus())
