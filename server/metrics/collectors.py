"""The metric families computed when Prometheus scrapes (custom collectors), and the checks every
verb of `ServerMetrics` applies to what it is told: a bad label value or count raises ValueError
quoting it, never a new time series no dashboard looks at."""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from prometheus_client.core import CounterMetricFamily

LISTENERS = ("data", "transfer")   # a worker's internal ports: the data plane, the peer transfer


def check_label(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")


def check_seconds(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number of seconds >= 0")


class ExpertTokens:
    """`elasticmoe_expert_tokens_total{layer, expert}`, accumulated in one int64 array per layer.

    The engine reports every MoE layer on every step, so adding must cost far less than a step:
    a vectorised add is ~2-4 us per layer where one prometheus_client child `inc()` per expert
    is ~45 us per layer of 128 experts (over 2 ms a step for 48 layers). Labels are built only
    when Prometheus scrapes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the engine adds while the HTTP thread scrapes
        self._by_layer: dict[int, np.ndarray] = {}  # layer -> [E] tokens routed so far

    def add(self, layer: int, counts: Sequence[int]) -> None:
        check_count("layer", layer)
        # np.asarray takes lists, numpy arrays and CPU torch tensors without a Python loop.
        step = np.asarray(counts)
        if step.ndim != 1:
            raise ValueError(f"expert counts of layer {layer} must be a flat sequence, got {counts!r}")
        if step.size == 0:
            return
        if step.dtype.kind not in "iu":
            raise ValueError(f"expert counts of layer {layer} must be ints, got {counts!r}")
        if step.min() < 0:
            raise ValueError(f"expert counts of layer {layer} must be >= 0, got {counts!r}")
        with self._lock:
            total = self._by_layer.get(layer)
            if total is None or total.size < step.size:
                # A layer appears with all its experts at 0, so the heatmap shows idle experts.
                grown = np.zeros(step.size, dtype=np.int64)
                if total is not None:
                    grown[: total.size] = total
                self._by_layer[layer] = total = grown
            total[: step.size] += step

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()  # names only, so the registry can refuse a clash

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            snapshot = [(layer, total.tolist()) for layer, total in sorted(self._by_layer.items())]
        family = self._family()
        for layer, totals in snapshot:
            for expert, total in enumerate(totals):
                family.add_metric((str(layer), str(expert)), total)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "elasticmoe_expert_tokens",
            "Tokens the router sent to each logical expert (layer, expert); a token choosing "
            "k experts counts once for each.",
            labels=("layer", "expert"),
        )


class StepPhases:
    """`elasticmoe_engine_step_phase_seconds_total{phase}` and `elasticmoe_engine_steps_total`:
    where engine steps spend their time, read from the engine's profile when Prometheus scrapes."""

    def __init__(self, source: Callable[[], tuple[dict[str, float], int]]) -> None:
        self._source = source

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals, steps = self._source()
        phases, count = self._families()
        for phase, seconds in sorted(totals.items()):
            phases.add_metric((phase,), seconds)
        count.add_metric((), steps)
        yield phases
        yield count

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (CounterMetricFamily("elasticmoe_engine_step_phase_seconds",
                                    "Wall-clock seconds engine steps spent in each phase (attention, router, "
                                    "experts = routing + exchange + workers, expert_ffn_on_worker = the slowest "
                                    "worker's compute, lm_head, inputs, sample_and_stream, schedule).",
                                    labels=("phase",)),
                CounterMetricFamily("elasticmoe_engine_steps", "Engine steps run."))


class RefusedConnections:
    """`elasticmoe_internal_connections_refused_total{worker, listener}`: connections a worker's
    internal ports closed unproven (no proof of the server's secret, a handshake past its timeout)
    or over their limit (experts/wire/framing.py), read from the workers' `stats` when Prometheus
    scrapes. A worker that is gone takes its series with it (its id is never reused)."""

    def __init__(self, source: Callable[[], dict[tuple[str, str], int]]) -> None:
        self._source = source

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for (worker, listener), count in sorted(self._source().items()):
            check_label("listener", listener, LISTENERS)
            check_count("count", count)
            family.add_metric((worker, listener), count)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "elasticmoe_internal_connections_refused",
            "Connections a worker's internal port (listener: data = the exchange, transfer = peer "
            "copies) closed without serving them: the peer did not prove it holds the server's "
            "secret, or the port was at its connection limit.",
            labels=("worker", "listener"),
        )
