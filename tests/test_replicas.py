"""Hot experts replicated in spare slots: the engine splits their tokens across the replicas, and
every stream keeps transformers' tokens."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.conftest import generate, running_server

PROMPTS = [[5, 17, 33], [100, 7, 9, 11, 250, 3, 44, 61, 8, 19, 27], list(range(40, 90))]


def test_hot_expert_replicas_share_the_tokens(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=2, replicate_hot=True) as server:
        expected = [generate(server.channel, p, max_tokens=24, ignore_eos=True)[0] for p in PROMPTS]
        # the routed-token counts the planner reads: make expert 3 of every layer far hotter than the rest
        server.engine.expert_load[:, 3] += 100 * int(server.engine.expert_load.max() + 1)
        resp = server.scale(2)   # a rebalance at the same worker count
        placement = resp.topology.placement
        for layer in range(placement.num_layers):
            assert len(placement.holders(layer, 3)) == 2, "the hot expert sits on both workers"
        assert resp.moves["remap"] > 0 and resp.bytes_copied == 0
        before = {w: server.controller._live[w].handle for w in placement.workers}
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(generate, server.channel, p, max_tokens=24, ignore_eos=True) for p in PROMPTS * 2]
            assert [f.result()[0] for f in futs] == expected * 2
        import ray

        served = [ray.get(h.stats.remote())["tokens"] for h in before.values()]
        assert all(n > 0 for n in served), served
