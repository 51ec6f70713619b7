"""Where a step's time goes: named wall-clock totals, accumulated only when profiling is on.

The model and the exchange call `timer("attention")` and the like; with profiling off that is a
shared no-op context, so the hot path pays one call and nothing else.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import ContextManager, Iterator

_NULL = contextlib.nullcontext()


class StepProfile:
    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._lock = threading.Lock()

    def __call__(self, name: str) -> ContextManager[None]:
        return self._timed(name) if self.enabled else _NULL

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                self.totals[name] += seconds

    def snapshot(self) -> tuple[dict[str, float], int]:
        with self._lock:
            return dict(self.totals), self.steps


NO_PROFILE = StepProfile()   # never enabled: the default for code paths that are not profiled
