"""Replica routing: the engine's log2phy tables (`Routing.build`) and the replica each (token,
expert) pair goes to (`Routing.owners`, server/engine/replicas.py): a group of a replicated expert
goes whole to the holder with the least work, a hot one (more than SPLIT_PAIRS pairs) is split
over its holders by token index, evenly; the same way every time; every pair goes to a worker that
holds its expert."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.model.backend import WorkerLost
from experts.placement.planner import plan_placement
from server.engine.exchange import RemoteExperts, Routing
from experts.wire.ring import SMALL_PAIRS
from server.engine.replicas import EXPERT_COST, SPLIT_PAIRS, assign

# 3 workers, 2 MoE layers, 4 experts. Layer 0: expert 1 on every worker, expert 2 on w0 and w2.
EXPERTS_OF = [
    [[0, 1, 2], [0]],
    [[1, 3], [1, 2]],
    [[1, 2], [3, 0]],
]


def routing() -> Routing:
    return Routing.build(7, ["w0", "w1", "w2"], EXPERTS_OF, num_layers=2, num_experts=4)


def test_build_lists_every_holder_in_worker_order() -> None:
    r = routing()
    assert r.version == 7 and r.workers == ("w0", "w1", "w2")
    assert r.count[0].tolist() == [1, 3, 2, 1] and r.count[1].tolist() == [2, 1, 1, 1]
    for layer in range(2):
        for e in range(4):
            n = int(r.count[layer][e])
            held = [w for w in range(3) if e in EXPERTS_OF[w][layer]]
            assert r.holders[layer][e, :n].tolist() == held, (layer, e)


def test_an_expert_without_a_holder_is_refused_naming_layer_and_expert() -> None:
    with pytest.raises(ValueError, match=r"v3: layer 1 experts \[3\] have no holder"):
        Routing.build(3, ["w0"], [[[0, 1, 2, 3], [0, 1, 2]]], num_layers=2, num_experts=4)


def test_a_hot_experts_tokens_alternate_over_its_holders() -> None:
    r = routing()
    # more tokens than SPLIT_PAIRS, top-2: every token picks expert 1 (3 holders) and expert 2 (w0, w2)
    tokens = SPLIT_PAIRS + 6
    ids = np.array([1, 2] * tokens)
    owner = r.owners(0, ids, top_k=2).reshape(tokens, 2)
    assert owner[:6, 0].tolist() == [0, 1, 2, 0, 1, 2]   # token t -> holder t mod 3
    assert owner[:6, 1].tolist() == [0, 2, 0, 2, 0, 2]   # token t -> holder t mod 2


def test_a_small_layer_goes_to_one_worker_that_holds_all_its_experts() -> None:
    """At most SMALL_PAIRS pairs (decode at batch 1-2): one worker answers the whole layer (one
    wake-up chain, ring.py spins it), the first that holds all its experts; else balanced."""
    holders, count = np.array([[0, 1]] * 4), np.array([2] * 4)
    assert assign(holders, count, np.array([2, 3]), 2, 2).tolist() == [0, 0]
    holders, count = np.array([[1, 0], [0, 1], [2, 2], [1, 2]]), np.array([1, 2, 1, 2])
    assert assign(holders, count, np.array([0, 1, 3, 1]), 2, 3).tolist() == [1] * 4   # w1 holds 0, 1, 3
    assert sorted(set(assign(holders, count, np.array([0, 2]), 2, 3).tolist())) == [1, 2]   # none holds both
    more = np.array([2, 3] * (SMALL_PAIRS // 2 + 1))     # past SMALL_PAIRS: balanced again
    assert sorted(set(assign(np.array([[0, 1]] * 4), np.array([2] * 4), more, 2, 2).tolist())) == [0, 1]


def test_small_groups_go_whole_to_the_least_loaded_holder() -> None:
    """Beyond SMALL_PAIRS, every expert on both workers: the groups are spread, each read once."""
    holders = np.array([[0, 1]] * 4)
    count = np.array([2] * 4)
    ids = np.array([2] * SMALL_PAIRS + [3])
    owner = assign(holders, count, ids, 1, 2)
    assert len(set(owner[:SMALL_PAIRS].tolist())) == 1 and owner[-1] != owner[0]
    # expert 0 lives on w0 only and is busy: the replicated ones go to w1 until it has as much
    holders = np.array([[0, 0], [0, 1], [0, 1], [0, 1]])
    count = np.array([1, 2, 2, 2])
    ids = np.array([0] * 10 + [1, 2, 3])
    owner = assign(holders, count, ids, 1, 2)
    assert owner[:10].tolist() == [0] * 10 and owner[10:].tolist() == [1, 1, 0], owner
    # a group is never split below SPLIT_PAIRS: all of a replicated expert's pairs on one worker
    ids = np.array([1] * SPLIT_PAIRS + [2] * 3)
    owner = assign(np.array([[0, 1]] * 4), np.array([2] * 4), ids, 1, 2)
    assert len(set(owner[:SPLIT_PAIRS].tolist())) == 1 and owner[-1] != owner[0]


def test_the_work_per_worker_is_balanced_within_one_group() -> None:
    """Random decode-sized layers over 8 experts on both of 2 workers: the workers' work (an
    expert's weights + its pairs) differs by at most the largest group's cost."""
    rng = np.random.default_rng(0)
    holders, count = np.array([[0, 1]] * 8), np.array([2] * 8)
    for tokens in (3, 8, 16, 32):
        ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(tokens)]).reshape(-1)
        owner = assign(holders, count, ids, 2, 2)
        routed = np.bincount(ids, minlength=8)
        work = [sum(routed[e] + EXPERT_COST for e in set(ids[owner == w].tolist())) for w in (0, 1)]
        assert abs(work[0] - work[1]) <= routed.max() + EXPERT_COST, (tokens, work)
        for e in set(ids.tolist()):
            assert len(set(owner[ids == e].tolist())) == 1, e     # each expert read by one worker


def test_a_single_holder_gets_every_token_of_its_expert() -> None:
    ids = np.array([0, 3] * 5)
    assert r_owners(0, ids).tolist() == [0, 1] * 5
    assert r_owners(1, np.array([3, 1, 3, 2])).tolist() == [2, 1, 2, 1]


def r_owners(layer: int, ids: np.ndarray) -> np.ndarray:
    return routing().owners(layer, ids, top_k=2)


@pytest.mark.parametrize("seed", range(5))
def test_every_pair_reaches_a_holder_and_the_split_is_even_and_repeatable(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tokens, top_k = 2 * SPLIT_PAIRS, 2
    # every token picks the hot expert 1 and one other, in random order
    ids = np.stack([rng.permutation([1, rng.choice([0, 2, 3])]) for _ in range(tokens)]).reshape(-1)
    r = routing()
    for layer in range(2):
        owner = r.owners(layer, ids, top_k)
        assert all(int(e) in EXPERTS_OF[int(w)][layer] for e, w in zip(ids, owner)), layer
        assert np.array_equal(owner, r.owners(layer, ids.copy(), top_k))
    shares = np.bincount(r.owners(0, ids, top_k)[ids == 1], minlength=3)   # expert 1: on all 3 in layer 0
    assert shares.sum() == tokens and shares.max() - shares.min() <= 1, shares


def test_the_planners_hot_replicas_route_to_every_replica() -> None:
    load = [[90, 3, 3, 3, 3, 3, 3, 3], [3] * 8]
    plan = plan_placement(None, ["a", "b", "c"], dict.fromkeys("abc", "n0"), 2, 8, 4, load=load, replicate_hot=True)
    holders = plan.placement.holders(0, 0)
    assert len(holders) >= 2
    r = Routing.build(2, plan.placement.workers, plan.placement.experts, 2, 8)
    ids = np.array([[0, 1 + t % 7] for t in range(SPLIT_PAIRS + 30)]).reshape(-1)
    owner = r.owners(0, ids, top_k=2)[ids == 0]
    assert {plan.placement.workers[w] for w in owner.tolist()} == set(holders)
    assert np.bincount(owner).max() - np.bincount(owner)[np.bincount(owner) > 0].min() <= 1


def test_with_a_lead_each_node_serves_from_its_first_holder() -> None:
    """Node-shared experts (every worker of a node holds them all) with `lead`: one worker per node
    serves every expert, its node-mates none; without `lead` every holder serves."""
    every = [list(range(4))] * 2
    nodes = ["n0", "n0", "n1", "n1"]
    lead = Routing.build(1, ["a", "b", "c", "d"], [every] * 4, 2, 4, nodes, lead=True)
    for layer in range(2):
        assert lead.count[layer].tolist() == [2] * 4
        assert lead.holders[layer].tolist() == [[0, 2]] * 4   # a for n0, c for n1
    assert lead.node.tolist() == [0, 0, 1, 1]
    spread = Routing.build(1, ["a", "b", "c", "d"], [every] * 4, 2, 4, nodes)
    assert spread.count[0].tolist() == [4] * 4
    # partitioned experts keep every worker: the first holder of each expert on a node serves it
    part = Routing.build(1, ["a", "b"], [[[0, 1], [0, 1]], [[1, 2, 3], [2, 3]]], 2, 4, ["n0", "n0"], lead=True)
    assert part.holders[0][:, 0].tolist() == [0, 0, 1, 1] and part.count[0].tolist() == [1, 1, 1, 1]


class _Link:
    """An engine-side link that answers every request with zeros and notes what it was sent."""

    def __init__(self, worker_id: str, kind: str = "tcp") -> None:
        self.worker_id = worker_id
        self.kind = kind
        self.last_compute_s = 0.0
        self.sent: list[tuple[int, int]] = []   # (pairs, team)
        self.gone = False

    def send(self, layer, x, expert_ids, counts, weights, team=1) -> None:
        self.sent.append((x.shape[0], team))

    def recv_into(self, layer, out) -> None:
        out.zero_()

    def send_rows(self, layer, hidden, rows, expert_ids, counts, weights, team=1) -> None:
        self.send(layer, hidden[rows], expert_ids, counts, weights, team)

    def recv_scatter(self, layer, dest, rows) -> None:
        dest[rows] = 0.0

    def alive(self) -> bool:
        return not self.gone

    def close(self) -> None:
        pass


def test_every_request_counts_the_workers_of_its_node_busy_on_the_layer() -> None:
    # w0, w1 on n0 with half the experts each; w2 on n1 with all of them
    experts_of = [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [list(range(8))]]
    r = Routing.build(1, ["w0", "w1", "w2"], experts_of, 1, 8, ["n0", "n0", "n1"])
    links = {"w0": _Link("w0", "ring"), "w1": _Link("w1", "ring"), "w2": _Link("w2", "tcp")}   # n0: the engine's
    backend = RemoteExperts(r, links, {0: 0}, 16)
    ids = torch.tensor([[e, (e + 4) % 8] for e in range(8)] * 20)   # 160 pairs: every worker gets some
    backend.finish(backend.start(0, torch.zeros(len(ids), 16), ids, torch.ones(len(ids), 2)))
    assert [links[w].sent[-1][1] for w in r.workers] == [2, 2, 1]
    # a small layer w0 takes alone (SMALL_PAIRS): the engine spins beside it, on its node
    backend.finish(backend.start(0, torch.zeros(1, 16), torch.tensor([[0, 1]]), torch.ones(1, 2)))
    assert links["w0"].sent[-1] == (2, 2) and len(links["w1"].sent) == 1
    # on another node the engine does not spin beside it: w2, the one worker holding both 3 and 7
    backend.finish(backend.start(0, torch.zeros(1, 16), torch.tensor([[3, 7]]), torch.ones(1, 2)))
    assert links["w2"].sent[-1] == (2, 1) and len(links["w0"].sent) == 2


def test_a_standing_by_worker_that_is_gone_is_reported() -> None:
    """Under a lead the node-mates get no work: no exchange would ever notice one dying, so the
    engine asks their links (`check_standby`), and only theirs."""
    every = [list(range(4))]
    r = Routing.build(1, ["a", "b", "c"], [every] * 3, 1, 4, ["n0"] * 3, lead=True)
    links = {w: _Link(w) for w in r.workers}
    backend = RemoteExperts(r, links, {0: 0}, 16)
    assert [link.worker_id for link in backend.standby] == ["b", "c"]
    backend.check_standby()
    links["a"].gone = True          # the lead is watched by its exchanges, not here
    backend.check_standby()
    links["c"].gone = True
    with pytest.raises(WorkerLost, match="lost expert worker c: standing by"):
        backend.check_standby()
