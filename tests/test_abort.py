"""A change that fails while preparing aborts: the old topology keeps serving with identical
outputs, and nothing reserved is left behind (no slot, no worker, no shared-memory segment). On one
node (every move a remap) and across two raylet nodes, each with its own segment directory, where
the failed move is a peer copy."""
from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
import ray

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import Traffic, generate, leftover_segments, running_server

PROMPTS = [[5, 17, 33, 8], [100, 7, 9, 11, 250, 3], list(range(40, 60))]


@pytest.fixture(scope="class")
def server(tiny_models, ray_local):
    with running_server(tiny_models["olmoe"], workers=2, share_node_experts=False) as s:   # a scale-down receives experts
        yield s


def _state(server) -> tuple:
    """Everything an aborted change must leave exactly as it was."""
    c = server.controller
    slots = {w: ray.get(live.handle.stats.remote())["slots"] for w, live in c._live.items()}
    return c.topology.version, tuple(c.topology.workers), slots, sorted(leftover_segments(server.namespace))


class TestOneNode:
    """The server lives for this class only: the two-node test below replaces the module's Ray."""

    def test_failed_transfer_aborts_and_leaves_nothing_behind(self, server):
        _failed_transfer_aborts_and_leaves_nothing_behind(server)

    def test_joining_worker_killed_mid_prepare_aborts(self, server):
        _joining_worker_killed_mid_prepare_aborts(server)


def _failed_transfer_aborts_and_leaves_nothing_behind(server):
    expected = [generate(server.channel, p, max_tokens=16, ignore_eos=True)[0] for p in PROMPTS]
    before = _state(server)
    # scale 2 -> 1: w1 receives w2's experts; its transfer fails after two of them arrived
    ray.get(server.controller._live["w1"].handle.inject_fault.remote(2))
    traffic = Traffic(server, PROMPTS, expected)
    admin = pb_grpc.AdminStub(server.channel)
    with pytest.raises(grpc.RpcError) as err:
        admin.Scale(pb.ScaleRequest(num_workers=1), timeout=120)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "injected fault" in err.value.details()
    traffic.finish()
    assert _state(server) == before
    assert 'elasticmoe_scale_events_total{direction="down",outcome="aborted"} 1.0' in server.metrics.render().decode()
    # the failpoint fired once: the same change now goes through
    assert admin.Scale(pb.ScaleRequest(num_workers=1), timeout=120).topology.version == before[0] + 1
    assert [generate(server.channel, p, max_tokens=16, ignore_eos=True)[0] for p in PROMPTS] == expected
    server.scale(2)


def _joining_worker_killed_mid_prepare_aborts(server):
    expected = [generate(server.channel, p, max_tokens=16, ignore_eos=True)[0] for p in PROMPTS]
    before = _state(server)
    live = {f"{server.namespace}-{w}" for w in server.controller._live}
    killed = threading.Event()
    joining: list[str] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed.is_set():
            new = [n for n in ray.util.list_named_actors() if n.startswith(server.namespace) and n not in live]
            if new:
                joining.extend(new)
                ray.kill(ray.get_actor(new[0]))
                killed.set()
            time.sleep(0.005)

    k = threading.Thread(target=killer)
    k.start()
    traffic = Traffic(server, PROMPTS, expected)
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.AdminStub(server.channel).Scale(pb.ScaleRequest(num_workers=3), timeout=120)
    killed.set()
    k.join()
    assert err.value.code() == grpc.StatusCode.ABORTED
    traffic.finish()
    assert _state(server) == before
    assert joining
    for name in joining:
        with pytest.raises(ValueError):
            ray.get_actor(name)   # no worker left behind


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, ray_local):
    """Two raylets on loopback with 2 CPUs each; the second keeps its segments in its own directory
    (as a second machine would). Yields {node id: segment directory}. It replaces ray_local's Ray."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    shm2 = str(tmp_path_factory.mktemp("node2-shm"))
    node2 = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", env_vars={"ELASTICMOE_SHM_DIR": shm2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    yield {cluster.head_node.node_id: "/dev/shm", node2.node_id: shm2}
    ray.shutdown()
    cluster.shutdown()


def test_failed_peer_copy_across_nodes_aborts_and_leaves_nothing_behind(tiny_models, two_nodes):
    # 2 CPUs a worker, 2 a node: the two workers sit on different nodes, so 2 -> 1 peer-copies
    # every expert of the leaving worker to the staying one
    with running_server(tiny_models["olmoe"], workers=2, worker_cpus=2) as server:
        workers = server.controller.topology.workers
        assert {info.node_id for info in workers.values()} == set(two_nodes)

        def state() -> tuple:
            c = server.controller
            slots = {w: ray.get(live.handle.stats.remote())["slots"] for w, live in c._live.items()}
            files = {node: sorted(f for f in os.listdir(d) if f.startswith(f"emoe-{server.namespace}-"))
                     for node, d in two_nodes.items()}
            return c.topology.version, tuple(c.topology.workers), slots, files

        expected = [generate(server.channel, p, max_tokens=16, ignore_eos=True)[0] for p in PROMPTS]
        before = state()
        assert all(before[3].values()), "each node's directory holds its worker's segments"
        stays = server.controller.topology.placement.workers[0]
        # the staying worker's receive fails after two experts were peer-copied in
        ray.get(server.controller._live[stays].handle.inject_fault.remote(2))
        traffic = Traffic(server, PROMPTS, expected)
        admin = pb_grpc.AdminStub(server.channel)
        with pytest.raises(grpc.RpcError) as err:
            admin.Scale(pb.ScaleRequest(num_workers=1), timeout=300)
        assert err.value.code() == grpc.StatusCode.ABORTED and "injected fault" in err.value.details()
        traffic.finish()
        assert state() == before
        assert [generate(server.channel, p, max_tokens=16, ignore_eos=True)[0] for p in PROMPTS] == expected
        # the same change, now without the fault: its moves were peer copies, none a remap
        done = admin.Scale(pb.ScaleRequest(num_workers=1), timeout=300)
        assert done.bytes_copied > 0 and done.bytes_remapped == 0 and done.bytes_loaded == 0
        assert [generate(server.channel, p, max_tokens=16, ignore_eos=True)[0] for p in PROMPTS] == expected
    for d in two_nodes.values():
        assert not [f for f in os.listdir(d) if f.startswith(f"emoe-{server.namespace}-")], d
