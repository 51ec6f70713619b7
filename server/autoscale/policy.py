"""The autoscaling policy: a pure function from a metrics snapshot and its own state to a worker count.

No torch, no ray, no clock, no I/O except `AutoscalePolicy.from_yaml`: `decide` is tested on
hand-made snapshots and simulated traces without a server. `server/autoscale/runner.py` applies it.

Words:
- **SLO miss**: the TTFT or ITL quantile over the window above its target, judged only on at
  least `min_samples` samples.
- **queue growth**: more than `max_waiting` requests waiting and, if an upscale happened while
  the queue was that long, more than were waiting then (a queue that drains after an upscale is
  not growing; without this a backlog would keep adding workers every cooldown until drained).
- **pressure**: an SLO miss or queue growth.
- **utilisation**: generated tokens/s over the window / (workers x capacity), capacity being the
  per-worker throughput the server measured at saturation.
- **miss utilisation**: the utilisation at the last SLO-driven upscale, i.e. where the SLO broke;
  raised when the SLO is later seen met at a higher utilisation.
- **fresh window**: more than `window_s` since the last change, so every sample in the window
  was taken on the current topology.

`decide` applies the first rule that matches:
0. A change of topology is running -> hold (metrics of a topology in flux decide nothing).
1. Workers outside [min_workers, max_workers] -> the nearest bound, at once.
2. An upscale is pending (the Ray cluster could not hold it) -> keep it while an SLO miss or
   more than `max_waiting` waiting lasts, holding the up-cooldown at now (nothing changed yet);
   drop it when both have gone.
3. Pressure -> up by `step`, clamped to max_workers. Queue growth waits `cooldown_up_s` since
   the last upscale; an SLO miss waits `cooldown_up_s` and a fresh window since the last
   upscale, or it would count again the misses that upscale already answered.
4. No pressure, nothing waiting, `cooldown_down_s` since the last change in either direction,
   and a fresh window -> down by `step`, clamped to min_workers, if either
   - the projected utilisation `tokens_per_s / (target x capacity)` is at most
     `downscale_headroom x min(1, miss utilisation)`, or
   - there is no capacity estimate but the server is idle: no token generated over the window,
     nothing running, nothing waiting. Without an estimate a loaded server is never scaled
     down on a guess.
5. Otherwise hold at the current count.

Why steady load does not flap: a downscale lands at a projected utilisation of at most
`downscale_headroom` (< 1) times the utilisation at which the SLO was last seen to break, so the
smaller topology keeps a margin below the load that caused the last upscale, while an upscale
needs a real miss or a growing queue. If the SLO breaks below `downscale_headroom` (a tight
SLO), that first miss lowers the ceiling and the policy stops trying the count that broke it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

import yaml

_INT_FIELDS = ("min_workers", "max_workers", "max_waiting", "step", "min_samples")
_FLOAT_FIELDS = ("ttft_slo_s", "itl_slo_s", "quantile", "window_s", "cooldown_up_s",
                 "cooldown_down_s", "downscale_headroom")


@dataclass(frozen=True)
class AutoscalePolicy:
    """What `elasticmoe serve --autoscale policy.yaml` enforces; see examples/policy.yaml."""

    min_workers: int
    max_workers: int
    ttft_slo_s: float                 # time to first token at `quantile`
    itl_slo_s: float                  # inter-token latency at `quantile`
    quantile: float = 0.95
    window_s: float = 30.0            # latencies and throughput are measured over this window
    max_waiting: int = 8              # more waiting requests than this is pressure
    step: int = 1                     # workers added or removed per decision
    cooldown_up_s: float = 10.0
    cooldown_down_s: float = 60.0
    downscale_headroom: float = 0.7   # max projected utilisation after a downscale (hysteresis)
    min_samples: int = 20             # fewer latency samples than this do not judge the SLO

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.min_workers < 1:
            raise ValueError(f"min_workers must be >= 1, got {self.min_workers}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= min_workers "
                             f"({self.min_workers})")
        for name in ("ttft_slo_s", "itl_slo_s", "window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        for name in ("cooldown_up_s", "cooldown_down_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")
        if not 0.0 < self.downscale_headroom < 1.0:
            # At 1 a downscale could land exactly where the next upscale starts: flapping.
            raise ValueError(f"downscale_headroom must be in (0, 1), got {self.downscale_headroom}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")

    @classmethod
    def from_yaml(cls, path: str) -> AutoscalePolicy:
        """Read a flat YAML mapping of the fields above; unknown or missing keys are errors."""
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of policy fields, got {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in fields)
        if unknown:
            raise ValueError(f"{path}: unknown policy keys {unknown}; known: {sorted(fields)}")
        missing = sorted(name for name, f in fields.items()
                         if f.default is dataclasses.MISSING and name not in raw)
        if missing:
            raise ValueError(f"{path}: missing required policy keys {missing}")
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


@dataclass(frozen=True)
class MetricsSnapshot:
    """What the server measured, as of `now` (seconds on the server's monotonic clock)."""

    now: float
    workers: int                      # current committed worker count
    ttft_q: float | None              # TTFT at the policy quantile over the window
    itl_q: float | None               # inter-token latency at the policy quantile over the window
    samples: int                      # latency samples in the window
    waiting: int
    running: int
    tokens_per_s: float               # generated tokens/s over the window
    capacity_tokens_per_s_per_worker: float | None  # measured at saturation; None = unknown
    scaling: bool                     # a change of topology is running


@dataclass(frozen=True)
class AutoscalerState:
    """The policy's memory between ticks; times are `MetricsSnapshot.now` values."""

    target: int                       # the last decided target
    last_up: float = -math.inf        # when the last upscale was decided
    last_down: float = -math.inf      # when the last downscale was decided
    pending: bool = False             # `target` waits for the Ray cluster to grow (set by the runner)
    miss_utilisation: float | None = None  # utilisation at which the SLO last broke
    waiting_at_up: int | None = None  # queue at the last upscale; cleared once within max_waiting


@dataclass(frozen=True)
class Decision:
    """The worker count wanted now (the current count when holding) and why."""

    target: int
    reason: str                       # a sentence with the numbers that caused it
    state: AutoscalerState


def decide(policy: AutoscalePolicy, snap: MetricsSnapshot, state: AutoscalerState) -> Decision:
    """One tick of the policy (rules in the module docstring). Deterministic, no side effects."""
    n, now = snap.workers, snap.now
    if snap.scaling:
        return Decision(state.target, f"hold: a change of topology is running ({n} workers "
                        f"committed); no decision on metrics of a topology in flux", state)

    util = _utilisation(snap, n)
    misses = _slo_misses(policy, snap)
    since_up = now - state.last_up
    since_change = now - max(state.last_up, state.last_down)
    # Windowed signals are judged only once the window holds no sample from before the change.
    window_fresh = since_change > policy.window_s
    if util is not None and state.miss_utilisation is not None and not misses and window_fresh \
            and snap.samples >= policy.min_samples and util > state.miss_utilisation:
        state = replace(state, miss_utilisation=util)  # the SLO held higher than it broke

    queue_over = snap.waiting > policy.max_waiting
    if not queue_over:
        state = replace(state, waiting_at_up=None)
    mark = state.waiting_at_up
    queue = None
    if queue_over and (mark is None or snap.waiting > mark):
        queue = f"{snap.waiting} requests waiting > max_waiting {policy.max_waiting}" + (
            f" and > {mark} at the last upscale" if mark is not None else "")

    if n < policy.min_workers:
        return _scale(state, snap, policy.min_workers, f"{n} workers is below min_workers "
                      f"{policy.min_workers}")
    if n > policy.max_workers:
        return _scale(state, snap, policy.max_workers, f"{n} workers is above max_workers "
                      f"{policy.max_workers}")

    if state.pending and state.target > n:
        # Nothing has changed yet, so a long queue is still pressure even if it stopped growing.
        still = misses + ([f"{snap.waiting} requests waiting > max_waiting "
                           f"{policy.max_waiting}"] if queue_over else [])
        if still:
            return Decision(state.target, f"still waiting for resources for {state.target} "
                            f"workers: {'; '.join(still)}", replace(state, last_up=now))
        return _hold(replace(state, pending=False), n, f"dropped the pending upscale to "
                     f"{state.target}: no pressure any more ({_slo_status(policy, snap)}, "
                     f"{snap.waiting} waiting)")
    state = replace(state, pending=False)

    pressure = misses + ([queue] if queue else [])
    if pressure:
        if n >= policy.max_workers:
            return _hold(state, n, f"{'; '.join(pressure)}; already at max_workers "
                         f"{policy.max_workers}")
        ready = [queue] if queue and since_up >= policy.cooldown_up_s else []
        slo_ready = since_up >= policy.cooldown_up_s and since_up > policy.window_s
        if misses and slo_ready:
            ready += misses
            if util is not None:
                state = replace(state, miss_utilisation=min(util, 1.0))
        if not ready:
            wait = (f"cooldown_up {policy.cooldown_up_s:g} s" if queue else
                    f"cooldown_up {policy.cooldown_up_s:g} s and a fresh {policy.window_s:g} s "
                    f"window")
            return _hold(state, n, f"{'; '.join(pressure)}; but the last upscale was "
                         f"{since_up:.1f} s ago (waiting for {wait})")
        target = min(policy.max_workers, n + policy.step)
        return _scale(state, snap, target, "; ".join(ready))

    target = max(policy.min_workers, n - policy.step)
    if target == n:
        return _hold(state, n, f"at min_workers {policy.min_workers}; {_slo_status(policy, snap)}")
    if queue_over:
        return _hold(state, n, f"{snap.waiting} requests waiting, no more than {mark} at the "
                     f"last upscale: the queue is draining")
    if snap.waiting > 0:
        return _hold(state, n, f"{snap.waiting} requests waiting; not scaling down")
    cap = snap.capacity_tokens_per_s_per_worker
    if cap is not None and cap > 0:
        miss = 1.0 if state.miss_utilisation is None else min(1.0, state.miss_utilisation)
        ceiling = policy.downscale_headroom * miss
        projected = snap.tokens_per_s / (target * cap)
        why = (f"projected utilisation with {_workers(target)} {projected:.2f} "
               f"({snap.tokens_per_s:.0f} tok/s over {target} x {cap:.0f} tok/s)")
        limit = f"headroom {ceiling:.2f}" + (
            f" (= {policy.downscale_headroom:g} x SLO-miss utilisation "
            f"{state.miss_utilisation:.2f})" if ceiling < policy.downscale_headroom else "")
        if projected > ceiling:
            return _hold(state, n, f"{why} > {limit}")
        why += f" <= {limit}"
    elif snap.tokens_per_s == 0 and snap.running == 0:
        why = f"idle: no tokens generated in the last {policy.window_s:g} s, nothing running"
    else:
        return _hold(state, n, f"no capacity estimate yet and not idle ({snap.tokens_per_s:.0f} "
                     f"tok/s, {snap.running} running): not scaling down on a guess")
    if since_change < policy.cooldown_down_s or not window_fresh:
        return _hold(state, n, f"{why}; but the last change was {since_change:.1f} s ago "
                     f"(waiting for cooldown_down {policy.cooldown_down_s:g} s and a fresh "
                     f"{policy.window_s:g} s window)")
    return _scale(state, snap, target, f"{why}; {_slo_status(policy, snap)}; queue empty")


def _scale(state: AutoscalerState, snap: MetricsSnapshot, target: int, why: str) -> Decision:
    n = snap.workers
    if target > n:
        # Remember the queue an upscale answered: a queue that only drains is not growing.
        waiting = snap.waiting if snap.waiting > 0 else None
        state = replace(state, target=target, last_up=snap.now, waiting_at_up=waiting)
        return Decision(target, f"scale up {n} -> {target}: {why}", state)
    state = replace(state, target=target, last_down=snap.now, waiting_at_up=None)
    return Decision(target, f"scale down {n} -> {target}: {why}", state)


def _hold(state: AutoscalerState, n: int, why: str) -> Decision:
    return Decision(n, f"hold at {n}: {why}", replace(state, target=n))


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _utilisation(snap: MetricsSnapshot, workers: int) -> float | None:
    cap = snap.capacity_tokens_per_s_per_worker
    if cap is None or cap <= 0 or workers <= 0:
        return None
    return snap.tokens_per_s / (workers * cap)


def _qname(q: float) -> str:
    return f"p{q * 100:g}"


def _slo_misses(policy: AutoscalePolicy, snap: MetricsSnapshot) -> list[str]:
    if snap.samples < policy.min_samples:
        return []
    q, out = _qname(policy.quantile), []
    for name, value, slo in (("TTFT", snap.ttft_q, policy.ttft_slo_s),
                             ("ITL", snap.itl_q, policy.itl_slo_s)):
        if value is not None and value > slo:
            out.append(f"{name} {q} {value:.3g} s > SLO {slo:.3g} s over {snap.samples} samples")
    return out


def _slo_status(policy: AutoscalePolicy, snap: MetricsSnapshot) -> str:
    if snap.samples < policy.min_samples:
        return f"{snap.samples} latency samples (< {policy.min_samples}, SLO not judged)"
    q = _qname(policy.quantile)
    parts = [f"{name} {q} {value:.3g} s <= {slo:.3g} s"
             for name, value, slo in (("TTFT", snap.ttft_q, policy.ttft_slo_s),
                                      ("ITL", snap.itl_q, policy.itl_slo_s))
             if value is not None]
    return ", ".join(parts) + f" over {snap.samples} samples" if parts else "no latencies"
