"""Rolling windows over timestamped samples: latency quantiles and event rates.

The autoscaler judges the SLO on "the TTFT at the 95th percentile over the last 30 s", which a
Prometheus histogram cannot answer exactly; these windows can. Pure bookkeeping: no torch, no ray,
no clock (every call is given `now`, so tests drive time by hand).

Timestamps must not go backwards by more than a little: expiry walks from the oldest sample and
stops at the first one still inside the window.
"""
from __future__ import annotations

import math
import threading
from collections import deque


def _check_window(window_s: float) -> None:
    if not (isinstance(window_s, (int, float)) and math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")


class LatencyWindow:
    """Timestamped samples kept for `window_s`; thread-safe; bounded memory.

    At most `max_samples` samples are kept: past that, the oldest are dropped first, so under a
    flood the window covers less time but stays correct for the newest samples.
    """

    def __init__(self, window_s: float, max_samples: int = 100_000) -> None:
        _check_window(window_s)
        if not (isinstance(max_samples, int) and max_samples >= 1):
            raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
        self.window_s = float(window_s)
        self.max_samples = max_samples
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (time, value)
        self._lock = threading.Lock()

    def add(self, value: float, now: float) -> None:
        with self._lock:
            self._samples.append((now, float(value)))
            self._expire(now)

    def quantile(self, q: float, now: float) -> float | None:
        """The nearest-rank `q` quantile: the smallest sample with at least a fraction `q` of the
        samples at or below it (so p95 of 20 samples is the 19th smallest, never an interpolation
        below a value that was really observed). None when the window is empty."""
        if not (0.0 <= q <= 1.0):
            raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        with self._lock:
            self._expire(now)
            values = sorted(v for _, v in self._samples)
        if not values:
            return None
        rank = max(1, math.ceil(q * len(values)))
        return values[rank - 1]

    def count(self, now: float) -> int:
        with self._lock:
            self._expire(now)
            return len(self._samples)

    def _expire(self, now: float) -> None:
        oldest_kept = now - self.window_s
        while self._samples and self._samples[0][0] < oldest_kept:
            self._samples.popleft()


class RateWindow:
    """Events per second over the last `window_s` (for example generated tokens); thread-safe.

    The rate is the sum over the window divided by `window_s`, so a window younger than
    `window_s` reads low; the autoscaler never judges a downscale on such a window (it waits at
    least `window_s` after serving starts and after every change).

    Memory is bounded without losing counts: adds closer together than `window_s / 1000` share
    one bucket, so expiry is exact to that resolution.
    """

    _BUCKETS_PER_WINDOW = 1000

    def __init__(self, window_s: float) -> None:
        _check_window(window_s)
        self.window_s = float(window_s)
        self._resolution = self.window_s / self._BUCKETS_PER_WINDOW
        self._buckets: deque[list[float]] = deque()  # [start time, count]
        self._total = 0.0
        self._lock = threading.Lock()

    def add(self, n: float, now: float) -> None:
        with self._lock:
            if self._buckets and now - self._buckets[-1][0] < self._resolution:
                self._buckets[-1][1] += n
            else:
                self._buckets.append([now, float(n)])
            self._total += n
            self._expire(now)

    def rate(self, now: float) -> float:
        with self._lock:
            self._expire(now)
            return self._total / self.window_s

    def _expire(self, now: float) -> None:
        oldest_kept = now - self.window_s
        while self._buckets and self._buckets[0][0] < oldest_kept:
            self._total -= self._buckets.popleft()[1]
        if not self._buckets:
            # An empty window is exactly zero (not float residue): "idle" is judged on it.
            self._total = 0.0
