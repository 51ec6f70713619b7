"""Live resharding under load: 8 clients stream greedy requests while the server goes
1 -> 2 -> 4 -> 3 -> 1 workers, on one Ray node (every move a zero-copy remap) and across two raylet
nodes on this machine (moves across nodes really copy), each raylet with its own segment directory
(ELASTICMOE_SHM_DIR) as if it were its own machine. Every request completes with the tokens the
unchanged server gave; versions grow by one per change; the bytes of each path are exactly one
expert's bytes per expert that path carried (counted from the topologies before and after); after
every change each node's directory holds exactly the segments its workers serve from."""
from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import grpc
import pytest

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import generate, running_server

CLIENTS = 8
SEQUENCE = (2, 4, 3, 1)
PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(3 + 5 * i)] for i in range(CLIENTS)]
MAX_TOKENS = 24
DEV_SHM = "/dev/shm"


def leftover_segments(namespace: str, directory: str = DEV_SHM) -> set[str]:
    return {f for f in os.listdir(directory) if f.startswith(f"emoe-{namespace}-")}


def moved_experts(old: pb.Topology, new: pb.Topology) -> Counter[str]:
    """Experts each path must carry from `old` to `new`: every (worker, layer, expert) `new` holds
    and `old` did not arrives by remap if `old` has a holder on the receiver's node, else by peer
    copy if `old` has a holder anywhere, else from disk."""
    def held(t: pb.Topology) -> set[tuple[str, int, int]]:
        return {(w.worker_id, ls.layer, e) for w in t.workers for ls in w.layers for e in ls.experts}

    node = {w.worker_id: w.node_id for t in (old, new) for w in t.workers}
    holder_nodes: dict[tuple[int, int], set[str]] = defaultdict(set)
    for w, layer, e in held(old):
        holder_nodes[layer, e].add(node[w])
    paths: Counter[str] = Counter()
    for w, layer, e in held(new) - held(old):
        nodes = holder_nodes[layer, e]
        paths["remap" if node[w] in nodes else "peer" if nodes else "disk"] += 1
    return paths


def segments_by_node(server) -> dict[str, set[str]]:
    """Node id -> names of the segments the live topology's workers on that node serve from."""
    topo = server.controller.topology
    out: dict[str, set[str]] = defaultdict(set)
    for (worker, _, _), name in topo.segments.items():
        out[topo.workers[worker].node_id].add(name)
    return out


def _reference(server) -> list[list[int]]:
    return [generate(server.channel, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS]


def _scale_under_load(server, expected: list[list[int]], after_change: Callable[[pb.ScaleResponse], None]
                      ) -> list[tuple[pb.ScaleResponse, float, float]]:
    """Clients loop over their prompt until the sequence of changes is done. Returns, per change,
    the response and its start/end time; asserts every request's tokens. `after_change` runs after
    each change has returned (so after its release), while traffic goes on."""
    stop = threading.Event()
    errors: list[str] = []
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()
    started = threading.Barrier(CLIENTS + 1)

    def client(i: int) -> None:
        first = True
        while not stop.is_set():
            t0 = time.monotonic()
            if first:
                started.wait(timeout=60)
                first = False
            try:
                got, _, last = generate(server.channel, PROMPTS[i], max_tokens=MAX_TOKENS, ignore_eos=True)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"client {i}: {exc.code().name} {exc.details()}")
                return
            with lock:
                spans.append((t0, time.monotonic()))
                if got != expected[i]:
                    errors.append(f"client {i}: tokens differ")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    admin = pb_grpc.AdminStub(server.channel)
    changes = []
    try:
        for n in SEQUENCE:
            time.sleep(0.3)
            t0 = time.monotonic()
            resp = admin.Scale(pb.ScaleRequest(num_workers=n), timeout=300)
            changes.append((resp, t0, time.monotonic()))
            after_change(resp)
    finally:
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert len(spans) >= CLIENTS * len(SEQUENCE)
    for resp, t0, t1 in changes:   # traffic really ran through every change
        assert any(a < t1 and b > t0 for a, b in spans), f"no request overlapped the change to {len(resp.topology.workers)}"
    return changes


def _check_versions_and_bytes(server, initial: pb.Topology, changes, cross_node: bool) -> None:
    expert = server.spec.expert_bytes
    versions = [resp.topology.version for resp, _, _ in changes]
    assert versions == list(range(initial.version + 1, initial.version + 1 + len(SEQUENCE)))
    assert [len(resp.topology.workers) for resp, _, _ in changes] == list(SEQUENCE)
    before, total = initial, Counter()
    for resp, _, _ in changes:
        moved = moved_experts(before, resp.topology)
        total += moved
        assert moved["disk"] == 0, "a live copy existed: nothing may come from disk"
        assert (resp.bytes_remapped, resp.bytes_copied, resp.bytes_loaded) == (
            expert * moved["remap"], expert * moved["peer"], 0), (len(resp.topology.workers), moved)
        if not cross_node:
            assert moved["peer"] == 0, "within one node every move is a remap"
        # every logical expert of every layer placed
        for layer in range(resp.topology.num_layers):
            held = {e for w in resp.topology.workers for e in w.layers[layer].experts}
            assert held == set(range(resp.topology.num_experts))
        before = resp.topology
    assert total["remap"] > 0, "some move stayed on a node"
    if cross_node:
        assert total["peer"] > 0, "some move crossed nodes"


def test_scale_under_load_single_node(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=1) as server:
        namespace = server.namespace
        initial = pb_grpc.AdminStub(server.channel).GetTopology(pb.GetTopologyRequest())
        expected = _reference(server)

        def segments_match(resp: pb.ScaleResponse) -> None:
            assert leftover_segments(namespace) == segments_by_node(server)[resp.topology.workers[0].node_id]

        changes = _scale_under_load(server, expected, segments_match)
        _check_versions_and_bytes(server, initial, changes, cross_node=False)
        # every change is reported with its bytes by path, and the serving metrics agree
        text = server.metrics.render().decode()
        assert 'elasticmoe_scale_events_total{direction="up",outcome="committed"} 2.0' in text
        assert 'elasticmoe_scale_events_total{direction="down",outcome="committed"} 2.0' in text
    assert leftover_segments(namespace) == set()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Two raylets on this machine, both on loopback: the controller sees two nodes. The second
    keeps its segments in its own directory, as a second machine would; the head (driver, engine)
    keeps /dev/shm. Yields (cluster, {node id: segment directory})."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    shm2 = str(tmp_path_factory.mktemp("node2-shm"))
    node2 = cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1", env_vars={"ELASTICMOE_SHM_DIR": shm2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    yield cluster, {cluster.head_node.node_id: DEV_SHM, node2.node_id: shm2}
    ray.shutdown()
    cluster.shutdown()


def test_scale_under_load_across_two_nodes(tiny_models, two_nodes):
    _, directory = two_nodes
    with running_server(tiny_models["qwen2_moe"], workers=1) as server:
        namespace = server.namespace
        initial = pb_grpc.AdminStub(server.channel).GetTopology(pb.GetTopologyRequest())
        expected = _reference(server)
        seen: Counter[str] = Counter()

        def segments_match(resp: pb.ScaleResponse) -> None:
            serving = segments_by_node(server)
            for node, path in directory.items():
                assert leftover_segments(namespace, path) == serving.get(node, set()), (node, path)
                seen[node] += bool(serving.get(node))

        changes = _scale_under_load(server, expected, segments_match)
        _check_versions_and_bytes(server, initial, changes, cross_node=True)
        nodes = {w.node_id for resp, _, _ in changes for w in resp.topology.workers}
        assert nodes == set(directory)
        assert all(seen[node] for node in directory), f"each node's directory held segments at some point: {seen}"
        for info in server.controller.topology.workers.values():
            assert info.data_address[0] == "127.0.0.1" and info.transfer_address[0] == "127.0.0.1"
    for path in directory.values():
        assert leftover_segments(namespace, path) == set(), path
