"""The autoscaler without a server: rolling windows, the policy on hand-made snapshots and
simulated traces, and the runner with fake callables."""
from __future__ import annotations

import logging
import math
import pathlib
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from server.autoscale.runner import AutoscaleRunner
from server.autoscale.policy import (AutoscalePolicy, AutoscalerState, Decision, MetricsSnapshot,
                               decide)
from server.autoscale.windows import LatencyWindow, RateWindow

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_policy_modules_import_neither_torch_nor_ray() -> None:
    code = ("import sys, server.autoscale.policy, server.autoscale.windows, server.autoscale.runner; "
            "bad = sorted(m for m in ('torch', 'ray') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- rolling windows -------------------------------------------------------------------------

def test_latency_window_nearest_rank_quantiles() -> None:
    w = LatencyWindow(window_s=10.0)
    assert w.quantile(0.95, now=0.0) is None
    for i, v in enumerate(random.Random(0).sample(range(1, 101), 100)):
        w.add(float(v), now=i * 0.01)
    assert w.count(now=1.0) == 100
    assert w.quantile(0.95, now=1.0) == 95.0
    assert w.quantile(0.5, now=1.0) == 50.0
    assert w.quantile(0.0, now=1.0) == 1.0
    assert w.quantile(1.0, now=1.0) == 100.0
    with pytest.raises(ValueError, match="1.5"):
        w.quantile(1.5, now=1.0)


def test_latency_window_expires_old_samples() -> None:
    w = LatencyWindow(window_s=5.0)
    w.add(9.0, now=0.0)
    w.add(1.0, now=3.0)
    assert w.quantile(0.99, now=4.0) == 9.0
    assert w.quantile(0.99, now=6.0) == 1.0   # the sample at t=0 left the window
    assert w.count(now=6.0) == 1
    assert w.count(now=8.5) == 0 and w.quantile(0.5, now=8.5) is None


def test_latency_window_bounded_memory_keeps_newest() -> None:
    w = LatencyWindow(window_s=100.0, max_samples=10)
    for i in range(1000):
        w.add(float(i), now=0.0)
    assert w.count(now=0.0) == 10
    assert w.quantile(0.01, now=0.0) == 990.0


def test_latency_window_is_thread_safe() -> None:
    w = LatencyWindow(window_s=100.0)

    def add() -> None:
        for i in range(2000):
            w.add(float(i), now=1.0)
            if i % 100 == 0:
                w.quantile(0.9, now=1.0)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.count(now=1.0) == 8000


def test_rate_window() -> None:
    r = RateWindow(window_s=10.0)
    assert r.rate(now=0.0) == 0.0
    for i in range(100):                # 100 adds of 5 events over 10 s
        r.add(5, now=i * 0.1)
    assert r.rate(now=9.95) == pytest.approx(50.0)
    assert r.rate(now=15.0) == pytest.approx(25.0, abs=0.6)  # half the window expired
    assert r.rate(now=20.0) == 0.0      # exactly zero: "idle" is judged on it
    for i in range(100_000):            # a flood shares buckets: memory stays bounded
        r.add(1, now=30.0 + i * 1e-6)
    assert len(r._buckets) < 1000
    assert r.rate(now=30.2) == pytest.approx(100_000 / 10.0)
    with pytest.raises(ValueError, match="window_s"):
        RateWindow(window_s=0)


# --- policy validation -----------------------------------------------------------------------

def policy(**kw: object) -> AutoscalePolicy:
    base: dict[str, object] = dict(min_workers=1, max_workers=8, ttft_slo_s=1.0, itl_slo_s=0.05,
                                   window_s=30.0, cooldown_up_s=10.0, cooldown_down_s=60.0)
    base.update(kw)
    return AutoscalePolicy(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw, quoted", [
    (dict(min_workers=4, max_workers=2), "max_workers (2)"),
    (dict(min_workers=0), "min_workers must be >= 1, got 0"),
    (dict(quantile=1.0), "quantile must be in (0, 1), got 1.0"),
    (dict(quantile=0), "got 0.0"),
    (dict(cooldown_up_s=-1), "cooldown_up_s must be >= 0, got -1.0"),
    (dict(cooldown_down_s=-5.0), "got -5.0"),
    (dict(step=0), "step must be >= 1, got 0"),
    (dict(downscale_headroom=1.0), "downscale_headroom must be in (0, 1), got 1.0"),
    (dict(ttft_slo_s=0), "ttft_slo_s must be > 0"),
    (dict(window_s=math.inf), "window_s must be a finite number"),
    (dict(max_waiting=-1), "max_waiting must be >= 0, got -1"),
    (dict(min_workers=1.5), "min_workers must be an integer, got 1.5"),
    (dict(max_workers=True), "max_workers must be an integer, got True"),
])
def test_policy_validation_quotes_bad_values(kw: dict[str, object], quoted: str) -> None:
    with pytest.raises(ValueError) as e:
        policy(**kw)
    assert quoted in str(e.value)


def test_policy_from_yaml(tmp_path: pathlib.Path) -> None:
    example = AutoscalePolicy.from_yaml(str(ROOT / "examples" / "policy.yaml"))
    assert (example.min_workers, example.max_workers) == (1, 8)
    assert isinstance(example.ttft_slo_s, float)

    f = tmp_path / "p.yaml"
    f.write_text("min_workers: 2\nmax_workers: 4\nttft_slo_s: 1\nitl_slo_s: 0.1\n")
    p = AutoscalePolicy.from_yaml(str(f))
    assert p.min_workers == 2 and p.ttft_slo_s == 1.0 and isinstance(p.ttft_slo_s, float)
    f.write_text("min_workers: 2\nmax_workers: 4\nttft_slo_s: 1\nitl_slo_s: 0.1\n"
                 "cooldown: 3\nmax_worker: 9\n")
    with pytest.raises(ValueError, match=r"unknown policy keys \['cooldown', 'max_worker'\]"):
        AutoscalePolicy.from_yaml(str(f))
    f.write_text("min_workers: 2\nmax_workers: 4\n")
    with pytest.raises(ValueError, match=r"missing required policy keys \['itl_slo_s', "):
        AutoscalePolicy.from_yaml(str(f))
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        AutoscalePolicy.from_yaml(str(f))
    f.write_text("min_workers: 5\nmax_workers: 4\nttft_slo_s: 1\nitl_slo_s: 0.1\n")
    with pytest.raises(ValueError, match="p.yaml: max_workers"):
        AutoscalePolicy.from_yaml(str(f))


# --- decide on hand-made snapshots -----------------------------------------------------------

def snap(**kw: object) -> MetricsSnapshot:
    """A calm snapshot at t=1000 with 3 workers at 50 % utilisation, SLO met."""
    base: dict[str, object] = dict(now=1000.0, workers=3, ttft_q=0.3, itl_q=0.02, samples=100,
                                   waiting=0, running=10, tokens_per_s=150.0,
                                   capacity_tokens_per_s_per_worker=100.0, scaling=False)
    base.update(kw)
    return MetricsSnapshot(**base)  # type: ignore[arg-type]


FRESH = AutoscalerState(target=3)


def test_up_on_ttft_miss() -> None:
    d = decide(policy(), snap(ttft_q=1.8, tokens_per_s=280.0), FRESH)
    assert d.target == 4
    assert d.reason == "scale up 3 -> 4: TTFT p95 1.8 s > SLO 1 s over 100 samples"
    assert d.state.target == 4 and d.state.last_up == 1000.0
    assert d.state.miss_utilisation == pytest.approx(280 / 300)


def test_up_on_itl_miss() -> None:
    d = decide(policy(), snap(itl_q=0.09), FRESH)
    assert d.target == 4 and "ITL p95 0.09 s > SLO 0.05 s" in d.reason


def test_up_on_queue_growth() -> None:
    d = decide(policy(), snap(waiting=12), FRESH)
    assert d.target == 4 and "12 requests waiting > max_waiting 8" in d.reason
    assert decide(policy(), snap(waiting=8), FRESH).target == 3   # at the limit is not growth


def test_too_few_samples_do_not_judge_the_slo() -> None:
    d = decide(policy(min_samples=20), snap(ttft_q=5.0, samples=19), FRESH)
    assert d.target == 3


def test_cooldown_up() -> None:
    st = replace(FRESH, last_up=995.0)
    d = decide(policy(), snap(waiting=12), st)
    assert d.target == 3
    assert "last upscale was 5.0 s ago (waiting for cooldown_up 10 s)" in d.reason
    assert decide(policy(), snap(waiting=12, now=1005.0), st).target == 4
    # An SLO miss waits a full window: the window still holds misses the last upscale answered.
    d = decide(policy(), snap(ttft_q=2.0, now=1025.0), st)
    assert d.target == 3 and "cooldown_up 10 s and a fresh 30 s window" in d.reason
    assert decide(policy(), snap(ttft_q=2.0, now=1025.5), st).target == 4


def test_a_draining_queue_is_not_growing() -> None:
    d = decide(policy(), snap(waiting=40), FRESH)
    assert d.target == 4 and d.state.waiting_at_up == 40
    st = d.state
    draining = decide(policy(), snap(workers=4, waiting=25, now=1020.0), st)
    assert draining.target == 4 and "the queue is draining" in draining.reason
    d = decide(policy(), snap(workers=4, waiting=41, now=1020.0), st)
    assert d.target == 5 and "41 requests waiting > max_waiting 8 and > 40 at the last" in d.reason
    # Back within max_waiting, the mark is forgotten: the next burst counts from scratch.
    calm = decide(policy(), snap(workers=4, waiting=3, now=1020.0), st).state
    assert calm.waiting_at_up is None
    assert decide(policy(), snap(workers=4, waiting=9, now=1021.0), calm).target == 5


def test_cooldown_down_counts_from_any_change() -> None:
    idle = snap(tokens_per_s=20.0)
    assert decide(policy(), idle, FRESH).target == 2
    for st in (replace(FRESH, last_up=950.0), replace(FRESH, last_down=950.0)):
        d = decide(policy(), idle, st)
        assert d.target == 3 and "last change was 50.0 s ago (waiting for cooldown_down" in d.reason
        assert decide(policy(), replace(idle, now=1010.0), st).target == 2
    # ...and never before a full window, whatever the cooldown says.
    assert decide(policy(cooldown_down_s=0), idle, replace(FRESH, last_up=980.0)).target == 3


def test_clamp_to_min_and_max() -> None:
    p = policy(min_workers=2, max_workers=4)
    d = decide(p, snap(workers=4, waiting=50), AutoscalerState(target=4))
    assert d.target == 4 and "already at max_workers 4" in d.reason
    d = decide(p, snap(workers=2, tokens_per_s=0.0, running=0), AutoscalerState(target=2))
    assert d.target == 2 and "at min_workers 2" in d.reason
    # Outside the bounds (someone scaled by hand): back to the bound at once, cooldowns or not.
    hot = AutoscalerState(target=3, last_up=999.0, last_down=999.0)
    assert decide(p, snap(workers=6), hot).target == 4
    assert decide(p, snap(workers=1), hot).target == 2


def test_step_size_and_clamp() -> None:
    p = policy(step=3, max_workers=5, min_workers=1)
    assert decide(p, snap(waiting=20), FRESH).target == 5            # 3 + 3 clamped to 5
    assert decide(p, snap(workers=2, waiting=20), AutoscalerState(2)).target == 5
    d = decide(p, snap(workers=5, tokens_per_s=10.0), AutoscalerState(5))
    assert d.target == 2 and "projected utilisation with 2 workers 0.05" in d.reason
    assert decide(p, snap(workers=2, tokens_per_s=1.0), AutoscalerState(2)).target == 1


def test_down_on_low_utilisation() -> None:
    # 150 tok/s on 2 workers of 100 tok/s = 0.75 > 0.7: hold; 130 tok/s = 0.65: down.
    d = decide(policy(), snap(tokens_per_s=150.0), FRESH)
    assert d.target == 3
    assert "projected utilisation with 2 workers 0.75 (150 tok/s over 2 x 100 tok/s) > " \
           "headroom 0.70" in d.reason
    d = decide(policy(), snap(tokens_per_s=130.0), FRESH)
    assert d.target == 2 and d.state.last_down == 1000.0
    assert d.reason.startswith("scale down 3 -> 2: projected utilisation with 2 workers 0.65")
    assert "TTFT p95 0.3 s <= 1 s" in d.reason
    # Never with requests waiting, never with the SLO missed.
    assert decide(policy(), snap(tokens_per_s=10.0, waiting=1), FRESH).target == 3
    assert decide(policy(), snap(tokens_per_s=10.0, itl_q=0.06), FRESH).target == 4


def test_no_down_without_capacity_estimate_unless_idle() -> None:
    unknown = dict(capacity_tokens_per_s_per_worker=None)
    d = decide(policy(), snap(tokens_per_s=5.0, **unknown), FRESH)
    assert d.target == 3 and "not scaling down on a guess" in d.reason
    assert decide(policy(), snap(tokens_per_s=0.0, running=2, **unknown), FRESH).target == 3
    d = decide(policy(), snap(tokens_per_s=0.0, running=0, samples=0, ttft_q=None, itl_q=None,
                              **unknown), FRESH)
    assert d.target == 2 and "idle" in d.reason


def test_no_decision_while_scaling() -> None:
    st = AutoscalerState(target=5, last_up=990.0)
    d = decide(policy(), snap(waiting=100, scaling=True), st)
    assert d.target == 5 and d.state == st and "change of topology is running" in d.reason


def test_pending_upscale_kept_while_pressure_lasts_then_dropped() -> None:
    st = AutoscalerState(target=4, last_up=990.0, pending=True)
    d = decide(policy(), snap(waiting=20), st)
    assert d.target == 4 and d.state.pending and d.state.last_up == 1000.0
    assert "still waiting for resources for 4 workers" in d.reason
    d = decide(policy(), snap(), st)
    assert d.target == 3 and not d.state.pending and "dropped the pending upscale to 4" in d.reason


def test_slo_miss_utilisation_lowers_the_downscale_ceiling() -> None:
    # The SLO broke at 50 % utilisation: a downscale must then project <= 0.7 x 0.5 = 0.35.
    st = AutoscalerState(target=4, miss_utilisation=0.5)
    d = decide(policy(), snap(workers=4, tokens_per_s=120.0), st)
    assert d.target == 4 and "with 3 workers 0.40 (120 tok/s over 3 x 100 tok/s) > headroom " \
        "0.35 (= 0.7 x SLO-miss utilisation 0.50)" in d.reason
    assert decide(policy(), snap(workers=4, tokens_per_s=100.0), st).target == 3
    # The SLO later seen met at a higher utilisation raises it.
    d = decide(policy(), snap(workers=4, tokens_per_s=240.0), st)
    assert d.state.miss_utilisation == pytest.approx(0.6)


# --- simulated traces ------------------------------------------------------------------------

class QueueSim:
    """A fluid queue served by `workers x CAP` tokens/s, sampled once a second.

    TTFT is a base plus the time to drain the backlog; ITL is `BASE_ITL / (1 - rho)` for the
    second's utilisation rho, so it misses an SLO of `k x BASE_ITL` above rho = 1 - 1/k. Demand
    has Gaussian noise. The latency and rate windows are the real ones.
    """

    CAP, TOKENS_PER_REQUEST, BASE_TTFT, BASE_ITL = 100.0, 50.0, 0.2, 0.01

    def __init__(self, p: AutoscalePolicy, workers: int, seed: int = 0, noise: float = 0.1):
        self.p, self.workers, self.noise = p, workers, noise
        self.rng = random.Random(seed)
        self.ttft, self.itl = LatencyWindow(p.window_s), LatencyWindow(p.window_s)
        self.tokens = RateWindow(p.window_s)
        self.backlog = 0.0

    def tick(self, now: float, demand: float) -> MetricsSnapshot:
        offered = max(0.0, demand * (1.0 + self.rng.gauss(0.0, self.noise))) if demand else 0.0
        capacity = self.workers * self.CAP
        self.backlog += offered
        served = min(self.backlog, capacity)
        self.backlog -= served
        self.tokens.add(served, now)
        rho = min(offered / capacity, 0.99)
        for _ in range(round(offered / self.TOKENS_PER_REQUEST)):
            self.ttft.add(self.BASE_TTFT + self.backlog / capacity, now)
            self.itl.add(self.BASE_ITL / (1.0 - rho) * (1 + self.rng.gauss(0, 0.02)), now)
        q = self.p.quantile
        return MetricsSnapshot(
            now=now, workers=self.workers, ttft_q=self.ttft.quantile(q, now),
            itl_q=self.itl.quantile(q, now), samples=self.ttft.count(now),
            waiting=round(self.backlog / self.TOKENS_PER_REQUEST),
            running=math.ceil(served / self.TOKENS_PER_REQUEST),
            tokens_per_s=self.tokens.rate(now), capacity_tokens_per_s_per_worker=self.CAP,
            scaling=False)


def run_trace(p: AutoscalePolicy, demand: list[float], workers: int,
              seed: int = 0) -> list[tuple[int, int, int, str]]:
    """Drive the real runner one tick a second against the simulator; a change commits at once.
    Returns the changes as (tick, from, to, reason)."""
    sim = QueueSim(p, workers, seed)
    now = {"t": 0, "demand": 0.0}

    def scale(n: int) -> None:
        sim.workers = n

    runner = AutoscaleRunner(p, lambda: sim.tick(float(now["t"]), now["demand"]), scale,
                             cluster_can_hold=lambda n: None)
    changes = []
    for t, d in enumerate(demand):
        now["t"], now["demand"], before = t, d, sim.workers
        decision = runner.step()
        if sim.workers != before:
            changes.append((t, before, sim.workers, decision.reason))
    return changes


def directions(changes: list[tuple[int, int, int, str]]) -> str:
    """'U' per upscale, 'D' per downscale, in order."""
    return "".join("U" if b > a else "D" for _, a, b, _ in changes)


LOOSE = dict(itl_slo_s=0.1)    # misses above 90 % utilisation: beyond the headroom
TIGHT = dict(itl_slo_s=0.02)   # misses above 50 % utilisation: below the headroom


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("slo", [LOOSE, TIGHT], ids=["loose-slo", "tight-slo"])
@pytest.mark.parametrize("demand", [40.0, 130.0, 260.0, 345.0, 490.0])
def test_steady_load_never_flaps(slo: dict[str, float], demand: float, seed: int) -> None:
    p = policy(**slo, window_s=20.0, cooldown_up_s=5.0, cooldown_down_s=30.0)
    for start, shape in ((1, "U*"), (8, "D*U*")):
        changes = run_trace(p, [demand] * 1300, workers=start, seed=1000 * seed + start)
        # Never a downscale after an upscale: at most one change of direction in 1300 s. From
        # above, a downscale may land where noise makes the SLO miss (a tight SLO breaks below
        # the headroom); the miss answers it with an upscale and the policy never goes back.
        assert re.fullmatch(shape, directions(changes)), changes
        assert len([c for c in changes if c[0] >= 300]) <= 2, changes
        final = changes[-1][2] if changes else start
        assert final * QueueSim.CAP > demand * 1.2, changes     # the load is served


def test_bursty_trace_scales_up_then_down() -> None:
    p = policy(**LOOSE, window_s=20.0, cooldown_up_s=5.0, cooldown_down_s=30.0)
    demand = [0.0] * 60 + [350.0] * 300 + [0.0] * 600   # idle -> 3.5 workers' worth -> idle
    changes = run_trace(p, demand, workers=1)
    ups = [c for c in changes if c[2] > c[1]]
    downs = [c for c in changes if c[2] < c[1]]
    assert directions(changes) == "U" * len(ups) + "D" * len(downs), changes
    assert all(60 <= t < 360 for t, *_ in ups) and all(t >= 360 for t, *_ in downs), changes
    assert ups[-1][2] >= 4                        # enough for 350 tok/s at 100 tok/s/worker
    assert downs[-1][2] == 1                      # back to min_workers when idle
    assert any("requests waiting > max_waiting" in r for *_, r in ups)


# --- the runner ------------------------------------------------------------------------------

class FakeServer:
    def __init__(self, workers: int = 3, fits_up_to: int = 100) -> None:
        self.snap = snap(workers=workers)
        self.fits_up_to = fits_up_to
        self.scaled: list[int] = []
        self.requested: list[int] = []
        self.fail = False
        self.calls = 0

    def snapshot(self) -> MetricsSnapshot:
        self.calls += 1
        return self.snap

    def scale(self, n: int) -> None:
        self.scaled.append(n)
        if self.fail:
            raise RuntimeError("worker 2 died during prepare")
        self.snap = replace(self.snap, workers=n)

    def can_hold(self, n: int) -> str | None:
        return None if n <= self.fits_up_to else f"needs {n} CPU, cluster has {self.fits_up_to}"

    def runner(self, **kw: object) -> AutoscaleRunner:
        return AutoscaleRunner(policy(), self.snapshot, self.scale, self.can_hold,
                               request_resources=self.requested.append,
                               initial_state=AutoscalerState(target=self.snap.workers),
                               **kw)  # type: ignore[arg-type]


def test_runner_scales_and_logs_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    server = FakeServer()
    seen: list[Decision] = []
    r = server.runner(on_decision=seen.append)
    server.snap = replace(server.snap, waiting=30)
    with caplog.at_level(logging.INFO, logger="server.autoscale.runner"):
        d = r.step()
    assert server.scaled == [4] and d.target == 4 and r.state.target == 4
    assert seen == [d] and r.last_decision == d
    assert any("scale up 3 -> 4: 30 requests waiting > max_waiting 8" in m
               for m in caplog.messages)
    assert server.requested == []


def test_runner_first_tick_counts_serving_start_as_a_change() -> None:
    server = FakeServer()
    server.snap = replace(server.snap, tokens_per_s=0.0, running=0)
    r = AutoscaleRunner(policy(), server.snapshot, server.scale, server.can_hold)
    d = r.step()
    assert d.target == 3 and "last change was 0.0 s ago" in d.reason and r.last_decision == d
    server.snap = replace(server.snap, now=1060.0)
    assert r.step().target == 2 and server.scaled == [2]


def test_runner_survives_scale_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    server = FakeServer()
    server.fail = True
    server.snap = replace(server.snap, waiting=30)
    r = server.runner(interval_s=0.01)
    with caplog.at_level(logging.INFO, logger="server.autoscale.runner"):
        d = r.step()
        assert "scale failed: RuntimeError: worker 2 died during prepare" in d.reason
        assert "scale to 4 workers failed" in caplog.text
        r.start()
        deadline = time.monotonic() + 5
        while server.calls < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        r.stop()
    assert server.calls >= 10 and r._thread is not None and not r._thread.is_alive()


def test_runner_pending_requests_resources_and_does_not_scale(
        caplog: pytest.LogCaptureFixture) -> None:
    server = FakeServer(workers=3, fits_up_to=3)
    server.snap = replace(server.snap, waiting=30)
    seen: list[Decision] = []
    r = server.runner(on_decision=seen.append)
    with caplog.at_level(logging.INFO, logger="server.autoscale.runner"):
        d = r.step()
    assert server.scaled == [] and server.requested == [4]
    assert d.target == 4 and d.state.pending and seen[-1].state.pending
    assert "pending: the Ray cluster cannot hold 4 workers now (needs 4 CPU, cluster has 3)" \
           in d.reason
    assert any("pending" in m for m in caplog.messages)
    # Still short: keeps waiting, asks once, never scales.
    server.snap = replace(server.snap, now=1001.0)
    assert r.step().state.pending and server.scaled == [] and server.requested == [4]
    # The nodes arrive: the retry scales.
    server.fits_up_to = 10
    server.snap = replace(server.snap, now=1002.0)
    d = r.step()
    assert server.scaled == [4] and not d.state.pending
    assert "the Ray cluster can hold it now" in d.reason


def test_runner_drops_pending_and_lowers_the_standing_request() -> None:
    server = FakeServer(workers=3, fits_up_to=3)
    server.snap = replace(server.snap, waiting=30)
    r = server.runner()
    r.step()
    assert server.requested == [4]
    server.snap = replace(server.snap, waiting=0, now=1001.0)
    d = r.step()
    assert d.target == 3 and not d.state.pending and server.scaled == []
    assert server.requested == [4, 3]   # Ray may release the node it was adding


def test_runner_stop_joins_within_interval() -> None:
    server = FakeServer()
    r = server.runner(interval_s=0.5)
    r.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    r.stop()
    assert time.monotonic() - t0 < 0.5
    assert r._thread is not None and not r._thread.is_alive() and server.calls >= 1
    with pytest.raises(ValueError, match="interval_s"):
        AutoscaleRunner(policy(), server.snapshot, server.scale, server.can_hold, interval_s=0)
