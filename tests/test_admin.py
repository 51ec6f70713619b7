"""Admin over gRPC: refusals that change nothing, warm standby, and the topology a user reads."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import generate, running_server


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=1, standby=1, standby_refill_delay_s=0) as s:
        deadline = time.monotonic() + 60
        while s.controller.standby_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield s


def test_topology_names_workers_nodes_and_experts(server):
    topo = pb_grpc.AdminStub(server.channel).GetTopology(pb.GetTopologyRequest())
    assert topo.version == 1 and topo.num_layers == len(server.spec.moe_layers) and topo.num_experts == 8
    assert len(topo.workers) == 1 and topo.workers[0].node_id
    assert [list(layer.experts) for layer in topo.workers[0].layers] == [list(range(8))] * topo.num_layers
    assert [layer.layer for layer in topo.workers[0].layers] == list(server.spec.moe_layers)


def test_a_target_the_cluster_cannot_hold_is_refused_and_changes_nothing(server):
    admin = pb_grpc.AdminStub(server.channel)
    before = admin.GetTopology(pb.GetTopologyRequest())
    with pytest.raises(grpc.RpcError) as err:
        admin.Scale(pb.ScaleRequest(num_workers=64))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "missing" in err.value.details() and "CPU" in err.value.details()
    assert admin.GetTopology(pb.GetTopologyRequest()) == before
    with pytest.raises(grpc.RpcError) as err:
        admin.Scale(pb.ScaleRequest(num_workers=0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_workers" in err.value.details()


def test_a_second_scale_while_one_runs_is_refused(server):
    admin = pb_grpc.AdminStub(server.channel)
    version = admin.GetTopology(pb.GetTopologyRequest()).version
    results: list[object] = []
    # 1 -> 3 needs one more worker than the standby one: a process start keeps this change running
    first = threading.Thread(target=lambda: results.append(admin.Scale(pb.ScaleRequest(num_workers=3), timeout=120)))
    first.start()
    deadline = time.monotonic() + 30
    while not server.controller.changing() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as err:
        admin.Scale(pb.ScaleRequest(num_workers=2), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already running" in err.value.details()
    first.join()
    assert results and results[0].topology.version == version + 1   # only the first change happened
    assert len(results[0].topology.workers) == 3
    server.scale(1)


def test_standby_worker_makes_scale_up_skip_the_process_start(server):
    deadline = time.monotonic() + 60
    while server.controller.standby_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    standby_ids = {live.info.worker_id for live in server.controller._standby}
    resp = pb_grpc.AdminStub(server.channel).Scale(pb.ScaleRequest(num_workers=2), timeout=120)
    joined = {w.worker_id for w in resp.topology.workers}
    assert standby_ids & joined, "the warm standby worker took the new place"
    assert resp.phase_seconds["start"] < 0.5   # no process was started for it
    assert generate(server.channel, [5, 6, 7], max_tokens=8, ignore_eos=True)[0]
    # the pool is refilled in the background
    deadline = time.monotonic() + 60
    while server.controller.standby_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.controller.standby_count() == 1


def test_asking_rays_autoscaler_for_more_nodes_works_against_a_real_cluster(server):
    """What the autoscaler does when a target does not fit: a real request_resources call, and the
    controller's own check names what is missing."""
    from server.control import cluster

    missing = server.controller.check_capacity(64)
    assert missing and "CPU" in missing
    cluster.request_resources(64, server.controller.resources)   # records the demand in Ray's GCS
    cluster.request_resources(0, server.controller.resources)    # and withdraws it
