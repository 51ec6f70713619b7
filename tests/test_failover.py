"""Failover: a lost worker is taken out by an ordinary change (new version), retried until it
commits; streams complete with the tokens they would have had; GetTopology is what the engine
serves; the worker count comes back by itself; and a failure after a commit is no abort."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import grpc
import pytest

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.control.failover import FailoverConfig
from tests.conftest import generate, running_server, wait_for
from tests.test_metrics import value

PROMPTS = [[5, 17, 33, 8], [100, 7, 9, 11, 250, 3], list(range(40, 60)), [3, 1, 4, 1, 5, 9, 2, 6]]
MAX_TOKENS = 24


class GapTraffic:
    """Clients streaming the prompts in a loop; records mismatches, errors and the longest gap
    between two tokens of one stream."""

    def __init__(self, channel: grpc.Channel, expected: list[list[int]]) -> None:
        self.channel, self.expected = channel, expected
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = 0
        self.gaps: list[tuple[float, float]] = []   # (previous token or the request, this token)
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(len(PROMPTS))]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        stub = pb_grpc.InferenceStub(self.channel)
        req = pb.GenerateRequest(prompt_token_ids=PROMPTS[i],
                                 sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        while not self.stop.is_set():
            tokens, last = [], time.monotonic()   # a stall before the first token counts too
            try:
                for msg in stub.Generate(req, timeout=120):
                    now = time.monotonic()
                    self.gaps.append((last, now))
                    tokens += msg.token_ids
                    last = now
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
                return
            if tokens != self.expected[i]:
                self.errors.append(f"prompt {i}: tokens differ")
            self.done += 1

    def longest_gap(self, start: float, end: float) -> float:
        """The longest wait for a token of one stream that overlaps [start, end]."""
        return max((b - a for a, b in self.gaps if a <= end and b >= start), default=0.0)

    def finish(self) -> None:
        time.sleep(0.3)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not self.errors, self.errors
        assert self.done > 0


def served_equals_reported(server) -> None:
    """GetTopology is the topology the engine runs its steps on."""
    topo = pb_grpc.AdminStub(server.channel).GetTopology(pb.GetTopologyRequest(), timeout=30)
    routing = server.engine.backend.routing
    assert topo.version == routing.version == server.engine.version
    assert sorted(w.worker_id for w in topo.workers) == sorted(routing.workers)


def test_sigkill_mid_stream_remaps_and_restores(tiny_models, ray_local, caplog):
    caplog.set_level(logging.ERROR, logger="server.engine.loop")
    with running_server(tiny_models["qwen3_moe"], workers=2, share_node_experts=False) as server:
        expected = [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS]
        v0 = server.controller.topology.version
        victim = server.controller.topology.placement.workers[1]
        pid = server.controller.topology.workers[victim].pid
        traffic = GapTraffic(server.channel, expected)
        wait_for(lambda: traffic.done >= 2, 60, "traffic")
        seen: list[tuple[int, tuple[str, ...], float]] = []
        disk_before = value(server.metrics, "elasticmoe_expert_bytes_moved_total", path="disk")   # start-up's load
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (not seen or seen[-1][0] < v0 + 2) and time.monotonic() < deadline:
            topo = server.controller.topology
            if not seen or seen[-1][0] != topo.version:
                seen.append((topo.version, topo.placement.workers, time.monotonic()))
            time.sleep(0.005)
        assert server.failover.wait_idle(120)
        traffic.finish()   # no stream failed, every one has the tokens it had before the loss
        # v0+1 serves without the victim (its experts remapped into the survivor), v0+2 restores 2
        assert seen[1][0] == v0 + 1 and victim not in seen[1][1] and len(seen[1][1]) == 1, seen
        topo = server.controller.topology
        assert topo.version == v0 + 2 and len(topo.workers) == 2 and victim not in topo.workers
        served_equals_reported(server)
        m = server.metrics
        assert value(m, "elasticmoe_worker_losses_total") == 1
        assert value(m, "elasticmoe_failover_seconds_count") == 1
        assert value(m, "elasticmoe_expert_bytes_moved_total", path="remap") > 0
        assert value(m, "elasticmoe_expert_bytes_moved_total", path="disk") == disk_before   # nothing reloaded
        assert value(m, "elasticmoe_degraded") == 0
        # the engine's link follows the worker's process: the loss is seen at its exit, not when the
        # kernel has torn it down and closed its socket (ring.py)
        assert any("the worker's process exited" in r.getMessage() for r in caplog.records), caplog.text
        gap = traffic.longest_gap(t_kill, seen[1][2])
        print(f"\nlongest token gap across the SIGKILL and the failover: {gap * 1000:.0f} ms; "
              f"failover {value(m, 'elasticmoe_failover_seconds_sum') * 1000:.0f} ms")
        assert [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS] == expected


@pytest.mark.parametrize("victim", [0, 1], ids=["lead", "standing-by"])
def test_sigkill_with_node_shared_experts_is_a_reroute(tiny_models, ray_local, victim):
    """The default placement on one node: every worker holds every expert (remaps of the same
    segments). A SIGKILLed worker's experts are then already held by the survivor: the failover
    moves nothing (no remap, no disk), streams keep their tokens, the restore brings back 2.
    The lead (worker 0, which computes) is seen lost by its exchange; the node-mate standing by
    (no work, no exchange) by the engine's look at its link (`check_standby`)."""
    with running_server(tiny_models["qwen3_moe"], workers=2) as server:
        placement = server.controller.topology.placement
        every = tuple(range(placement.num_experts))
        assert all(placement.held_by(w)[l] == every for w in placement.workers for l in range(placement.num_layers))
        expected = [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS]
        v0 = server.controller.topology.version
        victim = placement.workers[victim]
        m = server.metrics
        remap_before = value(m, "elasticmoe_expert_bytes_moved_total", path="remap")
        disk_before = value(m, "elasticmoe_expert_bytes_moved_total", path="disk")
        # at start each expert was read from disk once (one worker), the other worker remapped it
        from experts.model.dtypes import TORCH_DTYPES
        from memory.segments import ExpertShape
        spec = server.spec
        expert = ExpertShape(spec.hidden, spec.expert_intermediate, TORCH_DTYPES[spec.dtype]).nbytes
        assert disk_before == remap_before == expert * len(spec.moe_layers) * spec.num_experts
        traffic = GapTraffic(server.channel, expected)
        wait_for(lambda: traffic.done >= 2, 60, "traffic")
        os.kill(server.controller.topology.workers[victim].pid, signal.SIGKILL)
        wait_for(lambda: server.controller.topology.version >= v0 + 1 and
                 victim not in server.controller.topology.placement.workers, 60, "the reroute")
        remap_after_loss = value(m, "elasticmoe_expert_bytes_moved_total", path="remap")
        assert server.failover.wait_idle(120)
        traffic.finish()   # no stream failed, every one has the tokens it had before the loss
        assert remap_after_loss == remap_before, "the survivor already held the lost worker's experts"
        assert value(m, "elasticmoe_expert_bytes_moved_total", path="disk") == disk_before
        topo = server.controller.topology
        assert len(topo.workers) == 2 and victim not in topo.workers
        served_equals_reported(server)
        assert [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS] == expected


def test_sigstop_is_detected_by_the_exchange_deadline(tiny_models, ray_local):
    timeout = 1.5
    with running_server(tiny_models["mixtral"], workers=2, worker_timeout_s=timeout) as server:
        expected = [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS]
        v0 = server.controller.topology.version
        victim = server.controller.topology.placement.workers[0]
        pid = server.controller.topology.workers[victim].pid
        traffic = GapTraffic(server.channel, expected)
        wait_for(lambda: traffic.done >= 2, 60, "traffic")
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            wait_for(lambda: victim not in server.controller.topology.workers, 60, "the hung worker to be taken out")
            detected = time.monotonic() - t0
        finally:
            try:
                os.kill(pid, signal.SIGCONT)   # if it still exists, let it die of the SIGKILL it got
            except ProcessLookupError:
                pass
        assert server.failover.wait_idle(120)
        traffic.finish()
        print(f"\nhung worker out of the topology {detected:.2f}s after SIGSTOP (worker timeout {timeout}s)")
        # about the deadline, far from the 60 s socket timeout it took before; the margin is for a
        # loaded machine, not for a slower design
        assert detected < timeout + 8.0, detected
        assert server.controller.topology.version == v0 + 2 and len(server.controller.topology.workers) == 2
        served_equals_reported(server)


def test_a_failing_failover_is_retried_visibly_until_it_succeeds(tiny_models, ray_local):
    with running_server(tiny_models["qwen3_moe"], workers=2, share_node_experts=False) as server:
        expected = [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS]
        v0 = server.controller.topology.version
        # a backoff long enough to look at the failure while it lasts
        server.failover.config = FailoverConfig(backoff_first_s=2.0, backoff_max_s=2.0)
        victim, survivor = server.controller.topology.placement.workers[1], server.controller.topology.placement.workers[0]
        import ray

        ray.get(server.controller._live[survivor].handle.inject_fault.remote(0))  # its next receive fails
        traffic = GapTraffic(server.channel, expected)
        wait_for(lambda: traffic.done >= 2, 60, "traffic")
        os.kill(server.controller.topology.workers[victim].pid, signal.SIGKILL)
        wait_for(lambda: server.failover.state().attempts >= 1, 60, "a failed attempt")
        state = server.failover.state()
        assert "injected fault" in state.last_error and state.degraded, state
        assert value(server.metrics, "elasticmoe_degraded") == 1
        assert value(server.metrics, "elasticmoe_failover_failures_total") >= 1
        assert server.controller.topology.version == v0, "a failed attempt commits nothing"
        served_equals_reported(server)
        assert server.failover.wait_idle(120)
        traffic.finish()   # the held streams carried on once the retry committed
        topo = server.controller.topology
        assert victim not in topo.workers and len(topo.workers) == 2 and topo.version == v0 + 2
        assert server.failover.state().last_error == "" and value(server.metrics, "elasticmoe_degraded") == 0
        served_equals_reported(server)


def test_a_worker_killed_after_the_commit_of_a_scale_is_no_abort(tiny_models, ray_local):
    with running_server(tiny_models["qwen3_moe"], workers=2, share_node_experts=False) as server:
        expected = [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS]
        v0 = server.controller.topology.version
        victim = server.controller.topology.placement.workers[0]   # gives experts to the new worker
        pid = server.controller.topology.workers[victim].pid

        def kill_after_commit(phase: str) -> None:
            if phase == "releasing":
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the victim to die")

        report = server.controller.scale(3, on_phase=kill_after_commit)
        assert report.topology.version == v0 + 1 and len(report.topology.workers) == 3
        assert report.warnings and "release" in report.warnings[0], report.warnings
        # the next steps find the victim gone: failover, then the count of 3 comes back
        traffic = GapTraffic(server.channel, expected)
        wait_for(lambda: victim not in server.controller.topology.workers, 60, "failover")
        assert server.failover.wait_idle(120)
        traffic.finish()
        assert len(server.controller.topology.workers) == 3
        served_equals_reported(server)


def test_redundant_experts_make_a_loss_a_reroute_without_moves():
    from experts.placement.planner import plan_placement
    from server.control.failover import reroute

    nodes = {"w1": "n", "w2": "n", "w3": "n"}
    full = plan_placement(None, ["w1", "w2"], nodes, 2, 8, 8, redundant=8).placement
    assert all(full.held_by(w) == (tuple(range(8)),) * 2 for w in ("w1", "w2")), "every expert on both"
    plan = reroute(full, {"w2"})
    assert plan is not None and plan.moves == () and plan.placement.workers == ("w1",)
    some = plan_placement(None, ["w1", "w2", "w3"], nodes, 2, 8, 8, redundant=3).placement
    assert all(sum(len(some.held_by(w)[l]) for w in some.workers) == 8 + 3 for l in range(2))
    single = plan_placement(None, ["w1", "w2"], nodes, 2, 8, 8).placement
    assert reroute(single, {"w2"}) is None, "without replicas the lost experts must be placed again"


def test_a_loss_with_live_replicas_is_rerouted(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=2, redundant_experts=8) as server:
        expected = [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS]
        topo = server.controller.topology
        v0, (survivor, victim) = topo.version, topo.placement.workers
        held = topo.placement.held_by(survivor)
        assert held == topo.placement.held_by(victim), "every expert has a replica on each worker"
        traffic = GapTraffic(server.channel, expected)
        wait_for(lambda: traffic.done >= 2, 60, "traffic")
        os.kill(topo.workers[victim].pid, signal.SIGKILL)
        wait_for(lambda: server.controller.topology.version > v0, 60, "failover")
        rerouted = server.controller.topology
        assert rerouted.version == v0 + 1 and rerouted.placement.workers == (survivor,)
        assert rerouted.placement.held_by(survivor) == held, "nothing moved: the survivor serves its replicas"
        assert server.failover.wait_idle(120)
        traffic.finish()
        assert len(server.controller.topology.workers) == 2
        served_equals_reported(server)


def test_the_restore_starts_only_once_the_engine_has_resumed(tiny_models, ray_local):
    """The restore after a loss starts a process, which takes a core for a second or more: it waits
    until the held streams have had their first step on the topology without the lost worker, or it
    lengthens exactly the gap the failover keeps short. That first step is made slow here (0.3 s)
    so that a restore started at the commit would surely begin during it."""
    with running_server(tiny_models["qwen3_moe"], workers=2, share_node_experts=False) as server:
        expected = [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS]
        ctl, engine = server.controller, server.engine
        v0 = ctl.topology.version
        marks: dict[str, tuple[int, int]] = {}   # event -> (engine version, engine steps) at that moment
        commit, start_workers, step = ctl.engine_commit, ctl._start_workers, engine._step

        def committed(backend) -> None:
            commit(backend)
            marks.setdefault("failover committed", (backend.routing.version, engine.steps))

        def starting(count: int, use_standby: bool = True):
            if count:
                marks.setdefault("restore started", (engine.version, engine.steps))
            return start_workers(count, use_standby)

        def slow_first_step(plan) -> None:
            if "failover committed" in marks and "first step" not in marks:
                marks["first step"] = (engine.version, engine.steps)
                time.sleep(0.3)
            step(plan)

        ctl.engine_commit, ctl._start_workers, engine._step = committed, starting, slow_first_step
        traffic = GapTraffic(server.channel, expected)
        wait_for(lambda: traffic.done >= 2, 60, "traffic")
        victim = ctl.topology.placement.workers[1]
        os.kill(ctl.topology.workers[victim].pid, signal.SIGKILL)
        wait_for(lambda: ctl.topology.version >= v0 + 2, 120, "the failover and the restore")
        assert server.failover.wait_idle(120)
        traffic.finish()
        version, steps_at_commit = marks["failover committed"]
        assert version == v0 + 1
        assert marks["restore started"][0] == v0 + 1, marks
        assert marks["restore started"][1] > steps_at_commit, f"the restore began before the engine stepped: {marks}"
        assert len(ctl.topology.workers) == 2 and ctl.topology.version == v0 + 2
        served_equals_reported(server)
