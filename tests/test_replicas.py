"""Hot experts replicated in spare slots: the engine balances their tokens over the replicas (each
replica's worker really computes its share, counted by the workers themselves), and every stream
keeps transformers' greedy tokens."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ray

from tests.conftest import generate, running_server
from tests.test_parity import NEW_TOKENS, PROMPTS, hf_greedy

HOT = 3


def test_hot_expert_replicas_share_the_tokens_and_keep_transformers_tokens(tiny_models, ray_local):
    model = tiny_models["mixtral"]
    expected = [hf_greedy(model, p) for p in PROMPTS]
    with running_server(model, workers=2, replicate_hot=True, share_node_experts=False) as server:   # partitioned + hot replicas
        assert [generate(server.channel, p, max_tokens=NEW_TOKENS, ignore_eos=True)[0] for p in PROMPTS] == expected
        # the routed-token counts the planner reads: make expert HOT of every layer far hotter than the rest
        server.engine.expert_load[:, HOT] += 100 * int(server.engine.expert_load.max() + 1)
        resp = server.scale(2)   # a rebalance at the same worker count
        placement = resp.topology.placement
        for layer in range(placement.num_layers):
            assert len(placement.holders(layer, HOT)) == 2, "the hot expert sits on both workers"
        assert resp.moves["remap"] > 0 and resp.bytes_copied == 0
        handles = {w: server.controller._live[w].handle for w in placement.workers}
        served_before = {w: ray.get(h.stats.remote())["tokens"] for w, h in handles.items()}
        routed_before = server.engine.expert_load.copy()
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(generate, server.channel, p, max_tokens=NEW_TOKENS, ignore_eos=True)
                    for p in PROMPTS * 2]
            assert [f.result()[0] for f in futs] == expected * 2
        served = {w: ray.get(h.stats.remote())["tokens"] - served_before[w] for w, h in handles.items()}
        routed = server.engine.expert_load - routed_before     # [L, E] (token, expert) pairs routed
        assert sum(served.values()) == routed.sum(), "every routed pair computed exactly once"
        replicated = [(l, e) for l in range(placement.num_layers) for e in range(placement.num_experts)
                      if len(placement.holders(l, e)) > 1]
        shared = sum(int(routed[l, e]) for l, e in replicated)
        assert routed[:, HOT].sum() > 0 and shared >= routed[:, HOT].sum()
        for w in placement.workers:
            alone = sum(int(routed[l, e]) for l in range(placement.num_layers) for e in placement.held_by(w)[l]
                        if (l, e) not in replicated)
            # what w computed beyond its unreplicated experts came from the replicas; if the engine
            # ignored them the first holder would compute every replicated pair and the other none
            share = served[w] - alone
            assert 0 < share < shared, (w, served, alone, shared)
        # the replicas balance the workers' work (server/engine/replicas.py)
        assert min(served.values()) >= 0.6 * max(served.values()), served
