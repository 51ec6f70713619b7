"""Admin over gRPC: refusals that change nothing, warm standby, and the topology a user reads."""
from __future__ import annotations

import json
import os
import threading
import time

import grpc
import pytest
import ray

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
    standby = {live.info.worker_id: live for live in server.controller._standby}
    serving = set(server.controller.topology.workers)
    resp = pb_grpc.AdminStub(server.channel).Scale(pb.ScaleRequest(num_workers=2), timeout=120)
    joined = {w.worker_id for w in resp.topology.workers} - serving
    # the one new place went to a standby worker: no worker of the new topology is a fresh one
    assert len(joined) == 1 and joined <= set(standby), (joined, set(standby))
    (new,) = joined
    # and it is the same Ray actor, in the same process, that waited as standby
    handle = server.controller._live[new].handle
    assert handle._actor_id == standby[new].handle._actor_id
    assert ray.get(handle.__ray_call__.remote(lambda actor: os.getpid())) == standby[new].info.pid
    assert generate(server.channel, [5, 6, 7], max_tokens=8, ignore_eos=True)[0]
    # the pool is refilled in the background, by a new worker (a process start: slow on a busy machine)
    deadline = time.monotonic() + 240
    while server.controller.standby_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.controller.standby_count() == 1
    assert {live.info.worker_id for live in server.controller._standby}.isdisjoint(standby)


def recorded_demand() -> list[dict[str, float]]:
    """The bundles Ray's GCS holds as the standing request for its autoscaler (what
    `ray.autoscaler.sdk.request_resources` recorded), read back from the GCS."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(ray._private.worker.global_worker.gcs_client)
        return [dict(r.request.resources_bundle) for c in state.cluster_resource_constraints
                for r in c.resource_requests for _ in range(r.count)]
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_asking_rays_autoscaler_for_more_nodes_records_the_demand_in_the_gcs(server):
    """What the autoscaler does when a target does not fit: the controller's check names what is
    missing, and request_resources leaves the demand in Ray's GCS for Ray's autoscaler, then
    withdraws it."""
    from server.control import cluster

    missing = server.controller.check_capacity(64)
    assert missing and "CPU" in missing
    resources = server.controller.resources
    cluster.request_resources(64, resources)
    bundle = {"CPU": float(resources.cpus)} | ({"GPU": float(resources.gpus)} if resources.gpus else {})
    assert recorded_demand() == [bundle] * 64
    cluster.request_resources(0, resources)
    assert recorded_demand() == []
