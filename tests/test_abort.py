"""A change that fails while preparing aborts: the old topology keeps serving with identical
outputs, and nothing reserved is left behind (no slot, no worker, no shared-memory segment)."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import Traffic, generate, leftover_segments, running_server

PROMPTS = [[5, 17, 33, 8], [100, 7, 9, 11, 250, 3], list(range(40, 60))]


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    with running_server(tiny_models["olmoe"], workers=2) as s:
        yield s


def _state(server) -> tuple:
    """Everything an aborted change must leave exactly as it was."""
    c = server.controller
    slots = {w: ray.get(live.handle.stats.remote())["slots"] for w, live in c._live.items()}
    return c.topology.version, tuple(c.topology.workers), slots, sorted(leftover_segments(server.namespace))


def test_failed_transfer_aborts_and_leaves_nothing_behind(server):
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


def test_joining_worker_killed_mid_prepare_aborts(server):
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
