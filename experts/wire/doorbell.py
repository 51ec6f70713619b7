"""A doorbell between two processes on one node: a futex on a 32-bit counter in shared memory.

The ringer bumps the counter and wakes (one FUTEX_WAKE syscall, a microsecond whether or not
anyone sleeps); the waiter checks the counter (optionally for a short bounded spin), then sleeps
in FUTEX_WAIT, which the kernel only enters while the counter still holds the value the waiter
last saw, so a ring between the check and the sleep is never lost. Sleeping, not spinning, is
the point: the engine and the workers share few cores, and a spinning waiter would take the
core the process it waits for needs (measured on 2 loaded cores: a 20 us spin per wait raised
the engine's CPU per step by 40% and bought no wall time; the default is no spin). A caller that
knows a core is free (ring.py: the smallest exchanges) asks for a spin per wait; the spin yields
the CPU (and the GIL) every round, so a runnable thread beside it goes first. An eventfd
would need fd passing between unrelated processes; a futex needs only the shared mapping. Not
FUTEX_PRIVATE: the two sides are two processes. ctypes calls release the GIL, so other threads
run while one sleeps.
"""
from __future__ import annotations

import ctypes
import os
import platform
import time

import numpy as np

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
FUTEX_WAIT, FUTEX_WAKE = 0, 1
_WAKE_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc_syscall():
    machine = platform.machine()
    if machine not in _SYS_FUTEX:
        raise RuntimeError(f"no futex syscall number known for {machine!r}; the ring needs one")
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    return fn, _SYS_FUTEX[machine]


def seq_reached(value: int, target: int) -> bool:
    """value >= target for 32-bit sequence numbers that wrap."""
    return (value - target) & 0xFFFFFFFF < 0x80000000


class Doorbell:
    """One 32-bit counter at `words[index]` of a shared mapping whose base address is `base`."""

    def __init__(self, words: np.ndarray, index: int, base: int) -> None:
        assert words.dtype == np.uint32 and base % 4 == 0
        self._words = words
        self._index = index
        self._addr = ctypes.c_void_p(base + 4 * index)
        self._syscall, self._nr = _libc_syscall()

    def value(self) -> int:
        return int(self._words[self._index])

    def ring(self, value: int) -> None:
        """Publish `value` (the payload written before it is visible first: x86's stores are
        ordered, and the syscall is a full barrier) and wake every sleeper."""
        self._words[self._index] = value & 0xFFFFFFFF
        self._syscall(self._nr, self._addr, FUTEX_WAKE, _WAKE_ALL, None, None, 0)

    def wait(self, target: int, timeout: float, spin_s: float = 0.0) -> bool:
        """Until the counter reaches `target` (True) or `timeout` seconds pass (False); first
        spinning `spin_s` before sleeping."""
        words, i = self._words, self._index
        if seq_reached(int(words[i]), target):
            return True
        now = time.perf_counter()
        spin_end, end = now + spin_s, now + timeout
        while time.perf_counter() < spin_end:
            if seq_reached(int(words[i]), target):
                return True
            os.sched_yield()   # releases the GIL; a runnable thread on this CPU runs first
        ts = _Timespec()
        while True:
            seen = int(words[i])
            if seq_reached(seen, target):
                return True
            left = end - time.perf_counter()
            if left <= 0:
                return False
            ts.tv_sec, ts.tv_nsec = int(left), int((left % 1.0) * 1e9)
            r = self._syscall(self._nr, self._addr, FUTEX_WAIT, ctypes.c_uint32(seen), ctypes.byref(ts), None, 0)
            if r != 0:
                err = ctypes.get_errno()
                # EAGAIN: the counter moved before we slept; EINTR: a signal; ETIMEDOUT: loop checks
                if err not in (11, 4, 110):
                    raise OSError(err, f"futex wait: {os.strerror(err)}")
