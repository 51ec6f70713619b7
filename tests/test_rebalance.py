"""Live load balancing: a skewed load (prompts whose tokens the tiny model's own router sends to the
experts of one worker) raises the imbalance; a rebalance, by hand or by itself past the threshold,
lowers it as an ordinary change (new version) that on one node only remaps (0 bytes copied or
loaded), while streams running across it get exactly the tokens of the unchanged server and see no
pause longer than twice their steady gap. The pure parts (imbalance figure, hysteresis, window) are
tested alone below."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from experts.placement.balance import RebalanceGate, RebalanceRule, imbalance, worker_loads
from experts.placement.plan import Placement
from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.control.rebalance import ExpertLoadWindow
from tests.conftest import generate, running_server

PROMPT_LEN = 64
MAX_TOKENS = 24
GAP_FLOOR_S = 0.25   # a pause shorter than this is scheduling noise on a shared 2-core machine


def _routes(server, token: int) -> np.ndarray:
    """[L][E] tokens the model itself routes for a prompt of `token` repeated (prefill only).
    Every position sees the same hidden state (identical keys and values), so the whole prompt
    goes to the same top-k experts in every layer."""
    before = server.engine.expert_load.copy()
    generate(server.channel, [token] * 16, max_tokens=1)
    return server.engine.expert_load - before


def skewed_prompts(server, count: int = 6) -> list[list[int]]:
    """Prompts whose tokens the router sends to the first worker's experts (as much as it can)."""
    p = server.controller.topology.placement
    first = p.workers[0]
    share = []
    for t in range(3, 131):
        load = _routes(server, t).astype(float).tolist()
        per = worker_loads(p, load)
        share.append((sum(ws[0] for ws in per) / max(sum(sum(ws) for ws in per), 1e-9), t))
    share.sort(reverse=True)
    assert share[count - 1][0] >= 0.75, f"no prompts that route mostly to {first}: {share[:count]}"
    return [[t] * PROMPT_LEN for _, t in share[:count]]


class TimedStreams:
    """One client per prompt, looping until stopped; checks every completion against `expected`
    and records when each token arrived."""

    def __init__(self, server, prompts: list[list[int]], expected: list[list[int]]) -> None:
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.gaps: list[tuple[float, float]] = []   # (previous token, this token) of one stream
        self.done = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(server, p, e)) for p, e in zip(prompts, expected)]
        for t in self.threads:
            t.start()

    def _run(self, server, prompt: list[int], want: list[int]) -> None:
        stub = pb_grpc.InferenceStub(server.channel)
        while not self.stop.is_set():
            req = pb.GenerateRequest(prompt_token_ids=prompt,
                                     sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            got, prev, gaps = [], None, []
            try:
                for msg in stub.Generate(req, timeout=120):
                    now = time.monotonic()
                    got += msg.token_ids
                    if prev is not None:
                        gaps.append((prev, now))
                    prev = now
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
                return
            with self._lock:
                self.gaps += gaps
                self.done += 1
                if got != want:
                    self.errors.append(f"prompt {prompt[0]}: tokens differ")

    def max_gap(self, t0: float, t1: float) -> float:
        with self._lock:
            return max((b - a for a, b in self.gaps if b >= t0 and a <= t1), default=0.0)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not self.errors, self.errors
        assert self.done > 0


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=2, rebalance_window_s=4.0,
                        share_node_experts=False) as s:   # partitioned: what a rebalance changes
        yield s


def test_rebalance_by_hand_lowers_the_imbalance_remapping_only_while_streams_flow(server):
    admin = pb_grpc.AdminStub(server.channel)
    prompts = skewed_prompts(server)
    expected = [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in prompts]
    streams = TimedStreams(server, prompts, expected)
    time.sleep(4.5)                       # the window holds only the skewed load; a steady rhythm
    t_steady = time.monotonic()
    before, load, _ = server.rebalancer.imbalance()
    version = server.controller.topology.version
    t0 = time.monotonic()
    resp = admin.Rebalance(pb.RebalanceRequest(operation_id="even-out"), timeout=120)
    t1 = time.monotonic()
    time.sleep(1.0)
    streams.finish()
    after = imbalance(server.controller.topology.placement, load)
    steady, during = streams.max_gap(t_steady - 2.5, t_steady), streams.max_gap(t0, t1)
    print(f"\nimbalance {before:.2f} -> {after:.2f}; rebalance {resp.duration_seconds * 1000:.0f} ms, "
          f"{resp.experts_moved} experts remapped; longest token gap steady {steady * 1000:.0f} ms, "
          f"across the rebalance {during * 1000:.0f} ms")
    assert before >= 1.5, f"the skewed prompts did not skew the load: imbalance {before:.2f}"
    assert after <= before - 0.3, (before, after)
    assert resp.topology.version == version + 1 and resp.operation_id == "even-out"
    assert resp.experts_moved > 0 and resp.bytes_remapped == resp.experts_moved * server.spec.expert_bytes
    assert resp.bytes_copied == 0 and resp.bytes_loaded == 0
    assert during <= max(2 * steady, GAP_FLOOR_S), (steady, during)
    assert 'elasticmoe_scale_events_total{direction="rebalance",outcome="committed"} 1.0' in \
        server.metrics.render().decode()
    # the imbalance the gauge shows now is that of the new placement
    server.rebalancer.tick(time.monotonic())
    assert f"elasticmoe_expert_load_imbalance {server.rebalancer.imbalance()[0]}" in server.metrics.render().decode()


def test_past_the_threshold_the_server_rebalances_by_itself_once(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=2, rebalance_window_s=4.0, rebalance_threshold=1.4, share_node_experts=False,
                        rebalance_interval_s=0.0) as s:
        prompts = skewed_prompts(s)
        version = s.controller.topology.version
        expected = [generate(s.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in prompts]
        streams = TimedStreams(s, prompts, expected)
        deadline = time.monotonic() + 60
        while s.controller.topology.version == version and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(4.0)                   # four more ticks: the hysteresis keeps it from going again
        streams.finish()
        ops = [op for op in s.operations.registry.recent() if op.kind == "rebalance"]
        assert len(ops) == 1 and ops[0].phase == "done", ops
        assert s.controller.topology.version == version + 1
        assert ops[0].report.bytes_copied == 0 and ops[0].report.bytes_loaded == 0
        assert s.rebalancer.imbalance()[0] < 1.4


# -- the pure parts ------------------------------------------------------------------------------

def test_imbalance_is_max_over_mean_per_worker_summed_over_layers():
    p = Placement(("a", "b"), (((0, 1), (0, 2)), ((2, 3), (1, 3))))
    load = [[6, 2, 1, 1], [1, 1, 0, 0]]
    assert worker_loads(p, load) == [[8, 2], [1, 1]]
    # layers weigh by their tokens (a mean of per-layer ratios would say (1.6 + 1.0) / 2 = 1.3)
    assert imbalance(p, load) == pytest.approx((8 + 1) / (5 + 1))
    assert imbalance(p, [[0] * 4, [0] * 4]) == 1.0
    replicated = Placement(("a", "b"), (((0, 1),), ((0, 2, 3),)))   # expert 0 on both: its tokens split
    assert worker_loads(replicated, [[4, 1, 1, 1]]) == [[3, 4]]


def test_the_gate_fires_past_the_threshold_then_waits_for_the_load_to_change():
    gate = RebalanceGate(RebalanceRule(threshold=1.5, band=0.1, interval_s=10, min_tokens=100))
    assert not gate.wants(0, 2.0, tokens=50)          # too little load to judge
    assert not gate.wants(0, 1.45, tokens=500)
    assert gate.wants(0, 2.0, tokens=500)
    assert not gate.worth(2.0, 1.95) and gate.worth(2.0, 1.2)
    gate.ran(0, reached=1.6)                          # the plan could not get under the threshold
    assert not gate.wants(20, 1.65, tokens=500)       # same load: no second, useless change
    assert gate.wants(20, 1.8, tokens=500)            # the load moved (worse by more than the band)
    gate.ran(20, reached=1.1)
    assert not gate.wants(25, 1.9, tokens=500)        # within the interval
    assert gate.wants(31, 1.9, tokens=500)
    off = RebalanceGate(RebalanceRule())
    assert not off.wants(0, 5.0, tokens=10**6)        # threshold 0: by hand only
    with pytest.raises(ValueError, match="rebalance-threshold"):
        RebalanceRule(threshold=0.9)


def test_the_window_forgets_load_older_than_itself():
    now = [0.0]
    w = ExpertLoadWindow((1, 3), 4, window_s=10.0, clock=lambda: now[0])
    w.add(1, np.array([5, 0, 0, 1]))
    now[0] = 6.0
    w.add(3, np.array([0, 2, 0, 0]))
    assert w.load().tolist() == [[5, 0, 0, 1], [0, 2, 0, 0]]
    now[0] = 10.5                                     # the first step left the window
    assert w.load().tolist() == [[0, 0, 0, 0], [0, 2, 0, 0]]
    now[0] = 100.0
    w.add(1, np.array([1, 1, 1, 1]))                  # a slot reused by a later bucket starts at 0
    assert w.load().tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]


def test_the_rule_and_the_operation_registry_import_neither_torch_nor_ray():
    code = ("import sys; import experts.placement.balance, server.control.operations; "
            "print(sorted(m for m in ('torch', 'ray', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
