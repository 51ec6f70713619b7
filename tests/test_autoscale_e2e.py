"""The autoscaler end to end: a real server (tiny Mixtral, Ray workers, gRPC) started with
`--autoscale policy.yaml` and a tight SLO meets a bursty trace (idle -> many concurrent greedy
streams -> idle). It must scale up during the burst, come back to one worker after it, and fail
no request on the way. First, the snapshot the wiring reads from a server, on a fake one."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc
import yaml

from server.api import elasticmoe_pb2 as pb
from server.app import ServingStats
from server.autoscale.wiring import ServerSignals
from server.autoscale.policy import AutoscalePolicy
from server.metrics import ServerMetrics
from tests.conftest import generate, running_server

# -- the snapshot, on a fake server ----------------------------------------------------------------


class FakeServer:
    """What ServerSignals reads: controller (lock, topology), engine.counts(), stats windows."""

    def __init__(self, window_s: float) -> None:
        lock = threading.Lock()
        self.controller = SimpleNamespace(_lock=lock, changing=lock.locked, topology=None)
        self.set_topology(version=1, workers=1)
        self.queue = (0, 0)  # running, waiting
        self.engine = SimpleNamespace(counts=lambda: self.queue)
        self.stats = ServingStats(ServerMetrics())
        self.stats.set_window(window_s)

    def set_topology(self, version: int, workers: int) -> None:
        self.controller.topology = SimpleNamespace(version=version, workers={f"w{i}": None for i in range(workers)})


def test_snapshot_reads_windows_queue_and_measures_capacity_at_saturation() -> None:
    policy = AutoscalePolicy(min_workers=1, max_workers=4, ttft_slo_s=1.0, itl_slo_s=0.1, quantile=0.5, window_s=10.0)
    server, clock = FakeServer(policy.window_s), [100.0]
    signals = ServerSignals(server, policy, clock=lambda: clock[0])
    assert server.stats.tokens.window_s == policy.window_s

    def at(t: float, tokens: float = 0.0, running: int = 0, waiting: int = 0):
        clock[0] = t
        server.queue = (running, waiting)
        if tokens:
            server.stats.tokens.add(tokens, t)
        return signals.snapshot()

    snap = at(101.0)
    assert (snap.workers, snap.ttft_q, snap.itl_q, snap.samples, snap.scaling) == (1, None, None, 0, False)
    assert snap.capacity_tokens_per_s_per_worker is None
    for v in (0.1, 0.2, 0.3):
        server.stats.ttft.add(v, 101.0)
    for v in (0.01, 0.02):
        server.stats.itl.add(v, 101.0)
    snap = at(101.5, running=4, waiting=3)
    assert (snap.ttft_q, snap.itl_q, snap.samples, snap.running, snap.waiting) == (0.2, 0.01, 2, 4, 3)
    # Saturated, but the window still holds time from before serving started: not measured.
    assert at(105.0, tokens=500, waiting=3).capacity_tokens_per_s_per_worker is None
    # A fresh window, nothing waiting: the load, not the capacity.
    assert at(111.0, tokens=500).capacity_tokens_per_s_per_worker is None
    snap = at(112.0, waiting=2)               # 1000 tokens over 10 s on 1 worker
    assert snap.tokens_per_s == 100.0 and snap.capacity_tokens_per_s_per_worker == 100.0
    with server.controller._lock:             # someone else's change is running
        assert at(112.5, waiting=2).scaling
    server.set_topology(version=2, workers=2)
    snap = at(113.0, tokens=2000, waiting=5)  # the window spans the change: not measured
    assert snap.workers == 2 and snap.capacity_tokens_per_s_per_worker == 100.0
    snap = at(123.5, tokens=3000, waiting=5)  # fresh on 2 workers: 3000 / 10 s / 2
    assert snap.capacity_tokens_per_s_per_worker == 150.0
    assert at(134.0, tokens=100, waiting=5).capacity_tokens_per_s_per_worker == 150.0  # the highest stays


# -- a bursty trace, reusable by benchmarks ------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """`clients` concurrent streams kept open for `seconds` (0 clients: idle)."""

    seconds: float
    clients: int


def bursty_trace(idle_before_s: float, burst_s: float, idle_after_s: float, clients: int) -> list[Phase]:
    return [Phase(idle_before_s, 0), Phase(burst_s, clients), Phase(idle_after_s, 0)]


@dataclass
class Stream:
    """One request of a trace: what it asked for and how it ended."""

    phase: int
    client: int
    started: float
    ended: float = 0.0
    completion_tokens: int = 0
    finish: str = ""
    error: str = ""


@dataclass
class TraceResult:
    streams: list[Stream] = field(default_factory=list)
    started: float = 0.0
    phase_ends: list[float] = field(default_factory=list)  # monotonic time each phase ended

    def failed(self) -> list[Stream]:
        return [s for s in self.streams if s.error]


def prompt_ids(client: int, i: int) -> list[int]:
    return [(7 * client + 3 * i + j) % 500 + 3 for j in range(4 + client % 5)]


def drive_trace(channel: grpc.Channel, phases: list[Phase], max_tokens: int,
                max_requests_per_client: int = 1000, stream_timeout_s: float = 120.0) -> TraceResult:
    """Run `phases` back to back against `channel`: in each, `clients` threads each loop greedy
    streams of `max_tokens` (EOS ignored) until the phase's time is up or they have sent
    `max_requests_per_client`. A stream still open when its phase ends runs to completion; the
    function returns when every stream has ended (each is bounded by `stream_timeout_s`)."""
    result = TraceResult(started=time.monotonic())
    lock = threading.Lock()
    threads: list[threading.Thread] = []

    def client(phase: int, c: int, until: float) -> None:
        for i in range(max_requests_per_client):
            if time.monotonic() >= until:
                return
            s = Stream(phase, c, time.monotonic())
            try:
                _, _, last = generate(channel, prompt_ids(c, i), timeout=stream_timeout_s,
                                      max_tokens=max_tokens, ignore_eos=True)
                s.completion_tokens = last.completion_tokens
                s.finish = pb.FinishReason.Name(last.finish_reason)
            except grpc.RpcError as exc:
                s.error = f"{exc.code().name}: {exc.details()}"
            s.ended = time.monotonic()
            with lock:
                result.streams.append(s)
            if s.error:
                return

    t = result.started
    for p, phase in enumerate(phases):
        t += phase.seconds
        for c in range(phase.clients):
            th = threading.Thread(target=client, args=(p, c, t), name=f"trace-{p}-{c}", daemon=True)
            th.start()
            threads.append(th)
        time.sleep(max(0.0, t - time.monotonic()))
        result.phase_ends.append(time.monotonic())
    for th in threads:
        th.join(timeout=stream_timeout_s)
        assert not th.is_alive(), f"{th.name} still streaming after {stream_timeout_s} s"
    return result


# -- the test --------------------------------------------------------------------------------------

MAX_TOKENS = 24
CLIENTS = 16
POLICY = dict(
    min_workers=1, max_workers=3,
    ttft_slo_s=0.05, itl_slo_s=0.02,    # tight: a queue of 12 requests misses them at once
    quantile=0.9, window_s=3.0, max_waiting=2, step=1,
    cooldown_up_s=1.0, cooldown_down_s=2.0, min_samples=5,
)


class Watch:
    """Samples the worker count and the autoscaler's target gauge every 0.1 s."""

    def __init__(self, server) -> None:
        self.server = server
        self.workers: list[tuple[float, int]] = []
        self.targets: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.workers.append((time.monotonic(), len(self.server.controller.topology.workers)))
            self.targets.append(sample(self.server, "elasticmoe_autoscaler_target_workers"))

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def sample(server, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_autoscaler_scales_up_in_a_burst_and_back_down_after(tiny_models: dict[str, Path], ray_local: None,
                                                             tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    # max_running 4: a burst of 16 streams queues 12 (queue growth and TTFT misses).
    with running_server(tiny_models["mixtral"], workers=1, max_running=4, autoscale=str(policy)) as server:
        assert server.autoscaler is not None
        with Watch(server) as watch:
            trace = drive_trace(server.channel, bursty_trace(1.0, 10.0, 0.5, CLIENTS), MAX_TOKENS)
            burst_end = trace.phase_ends[1]
            deadline = time.monotonic() + 40
            while len(server.controller.topology.workers) > 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            settled = time.monotonic()
            # the topology switches at commit; the runner's tick that made the change returns (and
            # exports its target) only after the release that follows
            while sample(server, "elasticmoe_autoscaler_target_workers") != 1 and time.monotonic() < deadline + 10:
                time.sleep(0.2)
        decision = server.autoscaler.last_decision

        assert not trace.failed(), [s.error for s in trace.failed()][:5]
        burst = [s for s in trace.streams if s.phase == 1]
        assert len(burst) >= CLIENTS
        assert all(s.finish == "FINISH_REASON_LENGTH" and s.completion_tokens == MAX_TOKENS for s in trace.streams)

        up_during_burst = max(n for t, n in watch.workers if t <= burst_end)
        assert up_during_burst > 1, f"no upscale during the burst; last decision: {decision and decision.reason}"
        assert sample(server, "elasticmoe_scale_events_total", direction="up", outcome="committed") >= 1
        assert max(watch.targets) > 1
        assert len(server.controller.topology.workers) == 1, \
            f"still {len(server.controller.topology.workers)} workers {settled - burst_end:.0f} s after " \
            f"the burst; last decision: {decision and decision.reason}"
        assert sample(server, "elasticmoe_scale_events_total", direction="down", outcome="committed") >= 1
        assert sample(server, "elasticmoe_scale_events_total", direction="up", outcome="aborted") == 0
        assert sample(server, "elasticmoe_autoscaler_target_workers") == 1
        assert sample(server, "elasticmoe_expert_workers") == 1
        print(f"burst: {len(burst)} streams, up to {up_during_burst} workers during it "
              f"(max {max(n for _, n in watch.workers)}); back to 1 worker {settled - burst_end:.1f} s after it")

