"""A worker that dies while serving: the requests in flight keep their KV cache and their place,
the controller starts a replacement and places the lost experts again (from surviving copies, or
from the checkpoint where the dead worker held the only copy), and every stream completes with the
tokens it would have had."""
from __future__ import annotations

import time

import ray

from tests.conftest import Traffic, generate, running_server

PROMPTS = [[5, 17, 33, 8], [100, 7, 9, 11, 250, 3], list(range(40, 60)), [3, 1, 4, 1, 5, 9, 2, 6]]


def test_streams_survive_a_worker_killed_while_serving(tiny_models, ray_local):
    with running_server(tiny_models["qwen3_moe"], workers=2) as server:
        expected = [generate(server.channel, p, max_tokens=24, ignore_eos=True)[0] for p in PROMPTS]
        version = server.controller.topology.version
        victim = server.controller.topology.placement.workers[1]
        traffic = Traffic(server, PROMPTS, expected, max_tokens=24)
        time.sleep(0.5)
        ray.kill(server.controller._live[victim].handle)   # no goodbye: the process is gone
        deadline = time.monotonic() + 120
        while server.controller.topology.version == version and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        traffic.finish()   # no stream failed, every one has the tokens it had before
        topo = server.controller.topology
        assert topo.version == version + 1
        assert victim not in topo.workers and len(topo.workers) == 2
        for layer in range(len(server.spec.moe_layers)):
            assert {e for w in topo.placement.workers for e in topo.placement.held_by(w)[layer]} == set(range(8))
        text = server.metrics.render().decode()
        assert 'elasticmoe_expert_bytes_moved_total{path="disk"}' in text
        assert [generate(server.channel, p, max_tokens=24, ignore_eos=True)[0] for p in PROMPTS] == expected
