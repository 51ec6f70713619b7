"""One worker per node computes (`--node-lead`, the default with node-shared experts): it runs
every layer with the CPUs its process may run on, its node-mates stand by mapped and get no work;
tokens stay transformers'. Without the lead both workers compute, each on its share of the CPUs."""
from __future__ import annotations

import pytest
import ray

from experts.kernels.threads import available_cpus
from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import generate, running_server
from tests.test_parity import NEW_TOKENS, PROMPTS, hf_greedy


def _stats(server) -> dict[str, dict]:
    live = server.controller._live
    return {w: ray.get(live[w].handle.stats.remote()) for w in server.controller.topology.placement.workers}


@pytest.mark.parametrize("node_lead", [True, False])
def test_the_lead_computes_alone_with_the_nodes_cpus(tiny_models, ray_local, node_lead):
    d = tiny_models["mixtral"]
    expected = [hf_greedy(d, p) for p in PROMPTS]
    with running_server(d, workers=2, node_lead=node_lead) as server:
        warm = _stats(server)   # each worker's warm-up rows (server/control/warmup.py)
        for prompt, want in zip(PROMPTS, expected):
            assert generate(server.channel, prompt, max_tokens=NEW_TOKENS, ignore_eos=True)[0] == want
        lead, mate = server.controller.topology.placement.workers
        topo = pb_grpc.AdminStub(server.channel).GetTopology(pb.GetTopologyRequest(), timeout=30)
        assert {w.worker_id: w.computing for w in topo.workers} == {lead: True, mate: not node_lead}
        computing = server.metrics.registry.get_sample_value("elasticmoe_expert_workers_computing")
        assert computing == (1 if node_lead else 2)
        stats = _stats(server)
        served = {w: stats[w]["tokens"] - warm[w]["tokens"] for w in stats}
        cpus = available_cpus()
        ran = {w: {t for t, n in stats[w]["layers_by_threads"].items() if n > warm[w]["layers_by_threads"].get(t, 0)}
               for w in stats}   # the thread counts serving used
        if node_lead:
            assert served[lead] > 0 and served[mate] == 0, served
            # prefill on every CPU; decode's small layers on a share, the engine spinning beside
            assert ran[lead] == {cpus, max(1, cpus // 2)}, stats[lead]
        else:   # the prompts' prefill layers are spread over both: each ran on its share, always
            assert served[lead] > 0 and served[mate] > 0, served
            assert ran[lead] == ran[mate] == {max(1, cpus // 2)}, stats
