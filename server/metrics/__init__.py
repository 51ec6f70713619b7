"""Prometheus metrics of one server: the only package that knows Prometheus (the families
computed at scrape time are in `collectors.py`).

Every name, type and label here is public (CONTRACT.md): dashboards and alert rules in `deploy/`
are written against them, so rename nothing. Each `ServerMetrics` owns its own
`CollectorRegistry`, so several servers can live in one process (tests do) without sharing a
module-level global.

The engine reports facts through verbs (`request_finished`, `scale_event`, ...); label values are
checked here and a bad one raises `ValueError` quoting it, because a misspelt label value would
otherwise become a new time series that no dashboard looks at.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from server.metrics.collectors import (ExpertTokens, RefusedConnections, StepPhases, check_count, check_label,
                                       check_seconds)

REQUEST_STATUSES = ("ok", "invalid", "rejected", "cancelled", "error")
SCALE_DIRECTIONS = ("up", "down", "rebalance")
SCALE_OUTCOMES = ("committed", "aborted")
MOVE_PATHS = ("remap", "peer", "disk")
STREAM_APIS = ("grpc", "http")

# Bucket bounds in seconds. Alert thresholds in deploy/prometheus/rules.yml sit on bounds
# (TTFT 2.5 s, inter-token 0.2 s) so that histogram_quantile does not interpolate across them.
REQUEST_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 20, 40, 80)
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5,
)  # fmt: skip
SCALE_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class ServerMetrics:
    """All metrics of one server, in their own registry, with an optional /metrics endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        self._requests = Counter(
            "elasticmoe_requests", "Generate requests finished, by final status.", ["status"], registry=r
        )
        self._request_duration = Histogram(
            "elasticmoe_request_duration_seconds",
            "Seconds from a Generate request's arrival to its last streamed message.",
            buckets=REQUEST_DURATION_BUCKETS,
            registry=r,
        )
        self._ttft = Histogram(
            "elasticmoe_time_to_first_token_seconds",
            "Seconds from a Generate request's arrival to its first generated token (queueing included).",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self._inter_token = Histogram(
            "elasticmoe_inter_token_latency_seconds",
            "Seconds between two consecutive generated tokens of one request.",
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self._prompt_tokens = Counter(
            "elasticmoe_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self._generated_tokens = Counter(
            "elasticmoe_generated_tokens", "Tokens generated and streamed to clients.", registry=r
        )
        self._running = Gauge(
            "elasticmoe_requests_running", "Requests in the running batch (holding KV cache).", registry=r
        )
        self._waiting = Gauge(
            "elasticmoe_requests_waiting", "Requests admitted and queued, not yet running.", registry=r
        )
        self._kv_cache = Gauge(
            "elasticmoe_kv_cache_usage_ratio", "Fraction of KV cache blocks in use, 0 to 1.", registry=r
        )
        self._workers = Gauge(
            "elasticmoe_expert_workers", "Expert workers in the committed topology.", registry=r
        )
        self._computing = Gauge(
            "elasticmoe_expert_workers_computing", "Expert workers the engine sends work to; the others "
            "stand by, mapped, for their node's computing worker (--node-lead).", registry=r
        )
        self._topology_version = Gauge(
            "elasticmoe_topology_version", "Version of the committed topology; it only grows.", registry=r
        )
        self._scale_events = Counter(
            "elasticmoe_scale_events",
            "Changes of topology that ended, by direction and whether they committed or aborted.",
            ["direction", "outcome"],
            registry=r,
        )
        self._scale_duration = Histogram(
            "elasticmoe_scale_duration_seconds",
            "Seconds a change of topology took, from its request to its commit or abort.",
            ["direction"],
            buckets=SCALE_DURATION_BUCKETS,
            registry=r,
        )
        self._bytes_moved = Counter(
            "elasticmoe_expert_bytes_moved",
            "Expert weight bytes moved by changes of topology, by path: remap (handed over "
            "without a copy), peer (copied worker to worker), disk (read from the checkpoint).",
            ["path"],
            registry=r,
        )
        self._expert_tokens = ExpertTokens()
        r.register(self._expert_tokens)
        self._load_imbalance = Gauge(
            "elasticmoe_expert_load_imbalance",
            "Routed tokens per worker over the rebalance window, max/mean summed over MoE layers, "
            "under the committed placement: 1 is even, the worker count means one worker does all.",
            registry=r,
        )
        self._load_imbalance.set(1.0)
        self._autoscaler_target = Gauge(
            "elasticmoe_autoscaler_target_workers",
            "Expert workers the autoscaler last asked for (0 while no autoscaler runs).",
            registry=r,
        )

        # failover (server/control/failover.py): losses, the time to serve without the lost worker,
        # failed attempts (retried with backoff), and whether the server runs degraded right now
        self._worker_losses = Counter(
            "elasticmoe_worker_losses", "Expert workers lost while serving (died, or missed the exchange deadline).",
            registry=r)
        self._failover = Histogram(
            "elasticmoe_failover_seconds",
            "Seconds from a worker's loss to the commit of a topology without it (the engine stalls meanwhile).",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0), registry=r)
        self._failover_failures = Counter(
            "elasticmoe_failover_failures", "Failed attempts to take a lost worker out or restore the "
            "worker count (each is retried with backoff).", registry=r)
        self._degraded = Gauge(
            "elasticmoe_degraded", "1 while a lost worker is not yet replaced (or a failover attempt "
            "failed), else 0.", registry=r)
        self._stream_write_timeouts = Counter(
            "elasticmoe_stream_write_timeouts",
            "Streams ended by the server because their client left a message unread longer than "
            "--stream-write-timeout (their requests are cancelled), by API.",
            ["api"], registry=r)

        # Children that exist from the start export 0, so rate() and dashboards see every known
        # label value before the first event instead of a series that appears out of nowhere.
        for status in REQUEST_STATUSES:
            self._requests.labels(status=status)
        for direction in SCALE_DIRECTIONS:
            self._scale_duration.labels(direction=direction)
            for outcome in SCALE_OUTCOMES:
                self._scale_events.labels(direction=direction, outcome=outcome)
        for path in MOVE_PATHS:
            self._bytes_moved.labels(path=path)
        for api in STREAM_APIS:
            self._stream_write_timeouts.labels(api=api)

        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # -- requests ------------------------------------------------------------------------------

    def request_finished(self, status: str, duration_s: float | None = None, ttft_s: float | None = None) -> None:
        """Count one finished request; observe its duration and time to first token when given."""
        check_label("status", status, REQUEST_STATUSES)
        if duration_s is not None:
            check_seconds("duration_s", duration_s)
        if ttft_s is not None:
            check_seconds("ttft_s", ttft_s)
        self._requests.labels(status=status).inc()
        if duration_s is not None:
            self._request_duration.observe(duration_s)
        if ttft_s is not None:
            self._ttft.observe(ttft_s)

    def inter_token(self, seconds: float) -> None:
        check_seconds("seconds", seconds)
        self._inter_token.observe(seconds)

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        check_count("prompt", prompt)
        check_count("generated", generated)
        if prompt:
            self._prompt_tokens.inc(prompt)
        if generated:
            self._generated_tokens.inc(generated)

    def queue(self, running: int, waiting: int) -> None:
        check_count("running", running)
        check_count("waiting", waiting)
        self._running.set(running)
        self._waiting.set(waiting)

    def stream_write_timeout(self, api: str) -> None:
        """Count one stream ended because its client read nothing for the write deadline."""
        check_label("api", api, STREAM_APIS)
        self._stream_write_timeouts.labels(api=api).inc()

    def kv_cache_usage(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"ratio={ratio!r} must be between 0 and 1")
        self._kv_cache.set(ratio)

    # -- topology ------------------------------------------------------------------------------

    def workers(self, n: int) -> None:
        check_count("n", n)
        self._workers.set(n)

    def computing_workers(self, n: int) -> None:
        check_count("n", n)
        self._computing.set(n)

    def topology_version(self, v: int) -> None:
        check_count("v", v)
        self._topology_version.set(v)

    def scale_event(self, direction: str, outcome: str, duration_s: float | None = None) -> None:
        """Count one change of topology that ended; observe its duration when given."""
        check_label("direction", direction, SCALE_DIRECTIONS)
        check_label("outcome", outcome, SCALE_OUTCOMES)
        if duration_s is not None:
            check_seconds("duration_s", duration_s)
        self._scale_events.labels(direction=direction, outcome=outcome).inc()
        if duration_s is not None:
            self._scale_duration.labels(direction=direction).observe(duration_s)

    def worker_lost(self) -> None:
        self._worker_losses.inc()

    def failover(self, seconds: float) -> None:
        check_seconds("seconds", seconds)
        self._failover.observe(seconds)

    def failover_failed(self) -> None:
        self._failover_failures.inc()

    def degraded(self, on: bool) -> None:
        self._degraded.set(1 if on else 0)

    def bytes_moved(self, path: str, nbytes: int) -> None:
        check_label("path", path, MOVE_PATHS)
        check_count("nbytes", nbytes)
        self._bytes_moved.labels(path=path).inc(nbytes)

    def expert_tokens(self, layer: int, counts: Sequence[int]) -> None:
        """Add the tokens routed to each expert of one MoE layer in one step.

        `counts`: [E] ints >= 0 on the host (list, numpy array or CPU tensor); index = expert.
        """
        self._expert_tokens.add(layer, counts)

    def expert_load_imbalance(self, ratio: float) -> None:
        """max/mean routed tokens per worker over the rebalance window (>= 1)."""
        if not (math.isfinite(ratio) and ratio >= 1.0 - 1e-9):
            raise ValueError(f"ratio={ratio!r} must be a finite number >= 1")
        self._load_imbalance.set(ratio)

    def autoscaler_target(self, n: int) -> None:
        check_count("n", n)
        self._autoscaler_target.set(n)

    def watch_engine_phases(self, source: Callable[[], tuple[dict[str, float], int]]) -> None:
        """Export the engine's per-phase step time; `source()` -> (seconds by phase, steps)."""
        self.registry.register(StepPhases(source))

    def watch_worker_connections(self, source: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Export the connections workers' internal ports refused; `source()` -> {(worker,
        listener): refused so far}, called at every scrape (the controller asks the workers)."""
        self.registry.register(RefusedConnections(source))

    # -- exposition ----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on a daemon thread; port 0 picks a free port. Returns the port."""
        if self._http is not None:
            raise RuntimeError(f"metrics already served on port {self._http[0].server_port}")
        self._http = start_http_server(port, addr=host, registry=self.registry)
        return self._http[0].server_port

    def stop(self) -> None:
        """Stop the HTTP endpoint, if one runs, and free its port."""
        if self._http is None:
            return
        httpd, thread = self._http
        self._http = None
        httpd.shutdown()
        httpd.server_close()
        thread.join()
