"""Orchestrator-grade scaling: every change is an operation with an id. A retry with the same id is
the same operation (one change, one new version), `no_wait` returns before the commit and
GetOperation later shows it done, WatchOperations streams its phases in order, a change refused
before it was planned leaves no operation, and Topology names the workers a scale-down removes."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.cli import main as cli
from server.control.operations import ABORTED, DONE, OperationRegistry, PLANNED, PREPARING
from tests.conftest import running_server

ORDER = [pb.OPERATION_PHASE_PLANNED, pb.OPERATION_PHASE_PREPARING, pb.OPERATION_PHASE_COMMITTING,
         pb.OPERATION_PHASE_RELEASING, pb.OPERATION_PHASE_DONE]


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=1, share_node_experts=False) as s:   # a scale-down receives experts
        yield s


def _admin(server) -> pb_grpc.AdminStub:
    return pb_grpc.AdminStub(server.channel)


def _version(server) -> int:
    return _admin(server).GetTopology(pb.GetTopologyRequest()).version


def _at(server, workers: int) -> None:
    """Each test starts from the worker count it needs, whatever ran before it."""
    if len(server.controller.topology.workers) != workers:
        server.scale(workers)


def test_a_retry_with_the_same_id_is_the_same_change(server):
    admin, before = _admin(server), _version(server)
    answers: list[pb.ScaleResponse] = []
    # three callers at once (an orchestrator retrying a call it thinks timed out), one after
    callers = [threading.Thread(target=lambda: answers.append(
        admin.Scale(pb.ScaleRequest(num_workers=2, operation_id="grow-1"), timeout=120))) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    answers.append(admin.Scale(pb.ScaleRequest(num_workers=2, operation_id="grow-1"), timeout=120))
    assert len(answers) == 4
    assert {a.operation_id for a in answers} == {"grow-1"}
    assert {a.topology.version for a in answers} == {before + 1}
    assert _version(server) == before + 1          # one change, not four
    assert len({tuple(a.phase_seconds.items()) for a in answers}) == 1   # the same figures, not a rerun
    # the same id asking for something else is a client bug, not a new change
    with pytest.raises(grpc.RpcError) as err:
        admin.Scale(pb.ScaleRequest(num_workers=1, operation_id="grow-1"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grow-1" in err.value.details()
    assert _version(server) == before + 1


def test_watch_streams_a_changes_phases_in_order(server):
    _at(server, 2)
    admin = _admin(server)
    seen: list[pb.Operation] = []
    watching = admin.WatchOperations(pb.WatchOperationsRequest(), timeout=120)

    def read() -> None:
        try:
            for op in watching:
                seen.append(op)
        except grpc.RpcError as exc:   # our own cancel below ends the stream
            assert exc.code() == grpc.StatusCode.CANCELLED, exc

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)   # the watch is in place before the change starts
    resp = admin.Scale(pb.ScaleRequest(num_workers=1, operation_id="shrink-1"), timeout=120)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(o.phase == pb.OPERATION_PHASE_DONE for o in seen
                                                  if o.operation_id == "shrink-1"):
        time.sleep(0.05)
    watching.cancel()
    reader.join(timeout=30)
    mine = [o for o in seen if o.operation_id == "shrink-1"]
    phases = [o.phase for o in mine]
    assert phases == sorted(phases) and phases[-1] == pb.OPERATION_PHASE_DONE, phases
    assert set(phases) <= set(ORDER)
    # every phase entered is listed once, in order, with its start time and duration
    final = mine[-1]
    assert [p.phase for p in final.phases] == ORDER
    starts = [p.start_unix_seconds for p in final.phases]
    assert starts == sorted(starts) and all(p.seconds >= 0 for p in final.phases)
    assert final.result.topology.version == resp.topology.version and final.kind == "scale"
    assert final.target_workers == 1
    # a watch of one finished operation answers its final state and ends
    one = list(admin.WatchOperations(pb.WatchOperationsRequest(operation_id="shrink-1"), timeout=30))
    assert len(one) == 1 and one[0].phase == pb.OPERATION_PHASE_DONE
    assert "shrink-1" in [o.operation_id for o in admin.ListOperations(pb.ListOperationsRequest()).operations]


def test_no_wait_returns_before_the_commit_and_get_operation_shows_it_done(server):
    _at(server, 1)
    admin, before = _admin(server), _version(server)
    # a scale-up starts a worker process: seconds, so the answer surely comes before the commit
    resp = admin.Scale(pb.ScaleRequest(num_workers=2, no_wait=True), timeout=60)
    assert resp.operation_id and resp.topology.version == before
    op = admin.GetOperation(pb.GetOperationRequest(operation_id=resp.operation_id))
    assert op.phase in (pb.OPERATION_PHASE_PLANNED, pb.OPERATION_PHASE_PREPARING), op
    deadline = time.monotonic() + 120
    while op.phase != pb.OPERATION_PHASE_DONE and time.monotonic() < deadline:
        time.sleep(0.1)
        op = admin.GetOperation(pb.GetOperationRequest(operation_id=resp.operation_id))
    assert op.phase == pb.OPERATION_PHASE_DONE and op.result.topology.version == before + 1
    assert len(op.result.topology.workers) == 2 and op.result.operation_id == resp.operation_id
    assert _version(server) == before + 1


def test_topology_names_the_workers_a_scale_down_removes(server):
    _at(server, 2)
    admin = _admin(server)
    topo = admin.GetTopology(pb.GetTopologyRequest())
    assert len(topo.workers) == 2
    removable = list(topo.removable_workers)
    assert removable == [topo.workers[1].worker_id]
    after = admin.Scale(pb.ScaleRequest(num_workers=1), timeout=120).topology
    assert [w.worker_id for w in after.workers] == [w.worker_id for w in topo.workers if w.worker_id not in removable]
    assert list(after.removable_workers) == []


def test_a_refused_change_leaves_no_operation_and_an_aborted_one_is_not_rerun(server):
    admin, before = _admin(server), _version(server)
    with pytest.raises(grpc.RpcError) as err:
        admin.Scale(pb.ScaleRequest(num_workers=64, operation_id="too-big"), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        admin.GetOperation(pb.GetOperationRequest(operation_id="too-big"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    server.scale(2)
    before = _version(server)
    w1 = server.controller.topology.placement.workers[0]
    ray.get(server.controller._live[w1].handle.inject_fault.remote(1))   # its next receive fails
    for _ in range(2):   # the retry answers the same abort; it does not run the change again
        with pytest.raises(grpc.RpcError) as err:
            admin.Scale(pb.ScaleRequest(num_workers=1, operation_id="doomed"), timeout=120)
        assert err.value.code() == grpc.StatusCode.ABORTED and "injected fault" in err.value.details()
    op = admin.GetOperation(pb.GetOperationRequest(operation_id="doomed"))
    assert op.phase == pb.OPERATION_PHASE_ABORTED and "injected fault" in op.error
    assert [p.phase for p in op.phases][-1] == pb.OPERATION_PHASE_ABORTED
    assert pb.OPERATION_PHASE_COMMITTING not in [p.phase for p in op.phases]
    assert _version(server) == before


def test_cli_scale_no_wait_prints_the_id_and_operations_watch_follows_it(server, capsys):
    address = f"127.0.0.1:{server.port}"
    n = len(server.controller.topology.workers)
    assert cli(["scale", str(3 - n), "--no-wait", "--address", address]) == 0
    op_id = capsys.readouterr().out.strip()
    assert op_id and "\n" not in op_id
    assert cli(["operations", "--watch", op_id, "--address", address]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(op_id) and " done " in lines[-1]
    assert cli(["operations", "--address", address]) == 0
    assert op_id in capsys.readouterr().out


# -- the registry alone --------------------------------------------------------------------------

def test_history_is_bounded_and_never_drops_a_running_operation():
    reg = OperationRegistry(history=2)
    running, _ = reg.open("a", "scale", 2)
    reg.enter("a", PLANNED)
    for i in range(4):
        reg.open(f"f{i}", "scale", 1)
        reg.enter(f"f{i}", PLANNED)
        reg.enter(f"f{i}", ABORTED, error="x")
    kept = [op.operation_id for op in reg.recent()]
    assert "a" in kept and len(kept) == 2 and kept[-1] == "f3"
    reg.enter("a", PREPARING)
    assert reg.get("a").phases[0].end == reg.get("a").phases[1].start


def test_an_operation_id_must_be_printable_and_bounded():
    reg = OperationRegistry()
    for bad in ("x" * 129, "tab\there"):
        with pytest.raises(ValueError, match="operation_id"):
            reg.open(bad, "scale", 1)
    op, created = reg.open("ok", "rebalance", 2)
    assert created and reg.open("ok", "rebalance", 2) == (op, False)
    reg.enter("ok", PLANNED)
    reg.enter("ok", DONE)
    assert reg.get("ok").final
