"""The placement planner: tiny hand-made inputs, golden examples, then invariants."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from experts.placement import pack
from experts.placement.planner import SLACK, Move, Placement, Plan, plan_placement

ONE_NODE = {w: "n0" for w in "abcdefgh"}
Load = Sequence[Sequence[float]]


def check(plan: Plan, current: Placement | None, workers: list[str], L: int, E: int, S: int,
          load: Load | None = None, nodes: dict[str, str] = ONE_NODE) -> None:
    """Invariants every plan must satisfy, whatever its inputs; with a load, the balance bound too."""
    new, old = plan.placement, current or Placement((), ())
    assert new.workers == tuple(workers)
    assert new.num_layers == L and new.num_experts == E
    for l in range(L):
        assert set(new.log2phy(l)) == set(range(E)), f"layer {l}: some expert has no holder"
        assert all(len(new.held_by(w)[l]) <= S for w in workers), f"layer {l}: over {S} slots"
        for w in set(workers) | set(old.workers):  # after commit = before - releases + moves
            released = {e for (x, ll, e) in plan.releases if (x, ll) == (w, l)}
            arrived = {m.expert for m in plan.moves if (m.dst, m.layer) == (w, l)}
            assert set(held(new, w, l)) == set(held(old, w, l)) - released | arrived
            assert not released & set(held(new, w, l)) and not arrived & set(held(old, w, l))
        loads: dict[tuple[int, str], str] = {}   # (expert, node) -> the worker reading it from disk in this plan
        for m in (m for m in plan.moves if m.layer == l):
            live = old.holders(l, m.expert)
            if not live:   # no live copy: read from disk once per node, the node's other receivers remap it
                first = loads.setdefault((m.expert, nodes[m.dst]), m.dst)
                assert m.src == (None if first == m.dst else first) and m.same_node == (m.src is not None), m
                continue
            if m.src is not None:
                assert m.src in live
                near = [s for s in live if nodes[s] == nodes[m.dst]]
                assert m.same_node == bool(near) and (not near or m.src in near)
            else:
                assert not m.same_node
    if load is not None:
        assert_balanced(new, load)
    assert len(set(plan.moves)) == len(plan.moves) == plan.moved_experts()


def held(p: Placement, w: str, l: int) -> tuple[int, ...]:
    return p.held_by(w)[l] if w in p.workers else ()


def worker_loads(p: Placement, load: Load, l: int) -> list[float]:
    """Load of each worker in layer l, an expert's load split evenly over its replicas."""
    count = {e: len(ix) for e, ix in p.log2phy(l).items()}
    return [sum(load[l][e] / count[e] for e in p.experts[w][l]) for w in range(len(p.workers))]


def assert_balanced(p: Placement, load: Load) -> None:
    """The documented bound: mean - a <= worker load <= mean + a, a = largest load of one replica."""
    for l in range(p.num_layers):
        count = {e: len(ix) for e, ix in p.log2phy(l).items()}
        a = max(load[l][e] / count[e] for e in count)
        loads = worker_loads(p, load, l)
        mean = sum(load[l]) / len(loads)
        assert mean - a - 1e-6 <= min(loads) and max(loads) <= mean + a + 1e-6, (l, loads, mean, a)


def test_importing_the_planner_imports_neither_torch_nor_ray() -> None:
    code = "import sys, experts.placement.planner; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- golden examples ----------------------------------------------------------------------------

def test_golden_start_up_then_scale_up() -> None:
    nodes = {"a": "n0", "b": "n0", "c": "n1"}
    start = plan_placement(None, ["a", "b"], nodes, num_layers=1, num_experts=4, slots_per_worker=2)
    assert start.placement.experts == (((0, 2),), ((1, 3),))
    assert start.moves == (Move(0, 0, "a", None, False), Move(0, 2, "a", None, False),
                           Move(0, 1, "b", None, False), Move(0, 3, "b", None, False))
    assert start.releases == ()
    # a and b (2 each) are within the limit (ceil(4/3) = 2), but c would be idle: far below the
    # mean, it takes the largest item of the most-loaded worker (a, first in worker order)
    up = plan_placement(start.placement, ["a", "b", "c"], nodes, 1, 4, 2)
    assert up.placement.experts == (((0,),), ((1, 3),), ((2,),))
    assert up.moves == (Move(0, 2, "c", "a", False),)
    assert up.releases == (("a", 0, 2),)


def test_golden_hot_expert_is_replicated() -> None:
    # expert 0 carries 10 of 13: mean 3.25, 10 > 2 x mean -> a second replica (5 each), then not hot
    plan = plan_placement(None, ["a", "b"], ONE_NODE, 1, 4, 3, load=[[10, 1, 1, 1]], replicate_hot=True)
    assert plan.placement.experts == (((0, 1, 3),), ((0, 2),))
    assert plan.placement.holders(0, 0) == ("a", "b")
    assert worker_loads(plan.placement, [[10, 1, 1, 1]], 0) == [7, 6]


def test_golden_every_slot_used_rebalances_by_a_swap() -> None:
    # W*S = E: both hot experts on a (18 vs 4); nothing can move without something moving back
    cur = Placement(("a", "b"), (((0, 1, 2, 3),), ((4, 5, 6, 7),)))
    load = [[8, 8, 1, 1, 1, 1, 1, 1]]
    plan = plan_placement(cur, ["a", "b"], ONE_NODE, 1, 8, 4, load=load)
    check(plan, cur, ["a", "b"], 1, 8, 4, load)
    assert plan.placement.experts == (((1, 2, 3, 4),), ((0, 5, 6, 7),))
    assert plan.moves == (Move(0, 4, "a", "b", True), Move(0, 0, "b", "a", True))
    assert worker_loads(plan.placement, load, 0) == [11, 11]


def test_golden_a_new_replica_takes_the_slot_of_a_kept_expert() -> None:
    # expert 2 turns hot (20 of 23) and needs a replica on a, whose two slots hold 0 and 1: keeping
    # what is held gets stuck, so all items are placed afresh, each preferring its current holders
    cur = Placement(("a", "b"), (((0, 1),), ((0, 2),)))
    plan = plan_placement(cur, ["a", "b"], ONE_NODE, 1, 3, 2, load=[[2, 1, 20]], replicate_hot=True)
    check(plan, cur, ["a", "b"], 1, 3, 2, [[2, 1, 20]])
    assert plan.placement.experts == (((0, 2),), ((1, 2),))
    assert plan.moves == (Move(0, 2, "a", "b", True), Move(0, 1, "b", "a", True))
    assert set(plan.releases) == {("a", 0, 1), ("b", 0, 0)}


# ---- the Placement type ---------------------------------------------------------------------------

def test_placement_maps() -> None:
    lists: tuple = ([[2, 0], [1]], [[1, 0], [0]])  # lists are normalised to sorted tuples
    p = Placement(("a", "b"), lists)
    assert p.experts == (((0, 2), (1,)), ((0, 1), (0,)))
    assert (p.num_layers, p.num_experts) == (2, 3)
    assert p.log2phy(0) == {0: (0, 1), 1: (1,), 2: (0,)}
    assert p.holders(0, 0) == ("a", "b") and p.holders(1, 2) == ()
    assert p.held_by("b") == ((0, 1), (0,))
    assert p == Placement(("a", "b"), p.experts) and hash(p) == hash(Placement(("a", "b"), p.experts))
    with pytest.raises(ValueError, match="'z'"):
        p.held_by("z")
    with pytest.raises(ValueError, match=r"\['a', 'a'\]"):
        Placement(("a", "a"), (((0,),), ((1,),)))
    with pytest.raises(ValueError, match=r"layers \[1, 2\]"):
        Placement(("a", "b"), (((0,),), ((1,), (0,))))
    with pytest.raises(ValueError, match=r"\[1, 1\]"):
        Placement(("a",), (((1, 1),),))


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"workers": ["a", "b"], "slots_per_worker": 3}, "2 workers x 3 slots cannot hold 8"),
    ({"workers": ["a", "a"]}, r"\['a', 'a'\]"),
    ({"workers": []}, "at least one"),
    ({"nodes": {"a": "n0"}}, r"\['b'\] missing from nodes"),
    ({"load": [[1.0] * 8]}, "load must be"),
    ({"load": [[1.0] * 8, [1.0] * 7]}, r"\[8, 7\]"),
    ({"load": [[1.0] * 8, [1.0] * 7 + [-2.0]]}, r"load\[1\]\[7\] = -2.0"),
    ({"load": [[float("nan")] * 8] * 2}, "nan"),
    ({"num_experts": 0}, "got 2, 0, 4"),
    ({"current": Placement(("a",), (((0,),),))}, "1 layers"),
    ({"current": Placement(("z",), (((0,), (9,)),))}, r"\['z'\] missing"),
    ({"current": Placement(("a",), (((0,), (9,)),))}, "up to 9"),
])
def test_bad_input_raises_value_error_quoting_it(kwargs: dict, match: str) -> None:
    args = {"current": None, "workers": ["a", "b"], "nodes": ONE_NODE, "num_layers": 2, "num_experts": 8,
            "slots_per_worker": 4}
    with pytest.raises(ValueError, match=match):
        plan_placement(**{**args, **kwargs})


# ---- properties -----------------------------------------------------------------------------------

def test_uneven_counts() -> None:
    plan = plan_placement(None, ["a", "b", "c"], ONE_NODE, 2, 8, 8)
    check(plan, None, ["a", "b", "c"], 2, 8, 8, [[1.0] * 8] * 2)
    for l in range(2):
        assert [len(plan.placement.held_by(w)[l]) for w in "abc"] == [3, 3, 2]


def test_start_up_reads_everything_from_disk_once() -> None:
    plan = plan_placement(None, ["a", "b"], ONE_NODE, 3, 6, 4)
    check(plan, None, ["a", "b"], 3, 6, 4)
    assert plan.moved_experts() == 18
    assert all(m.src is None and not m.same_node for m in plan.moves)


def test_skewed_load_moves_the_fewest_experts_to_balance() -> None:
    # a carries 22 of 30 (mean 15); moving the 8 to b, which has free slots, is enough
    cur = Placement(("a", "b"), (((0, 1, 2, 3),), ((4, 5, 6, 7),)))
    load = [[8, 8, 2, 4, 2, 2, 2, 2]]
    plan = plan_placement(cur, ["a", "b"], ONE_NODE, 1, 8, 6, load=load)
    check(plan, cur, ["a", "b"], 1, 8, 6, load)
    assert plan.moved_experts() == 1 and plan.moves[0].dst == "b"
    assert worker_loads(plan.placement, load, 0) == [14, 16]


def test_unchanged_workers_and_uniform_load_move_nothing() -> None:
    cur = plan_placement(None, ["a", "b", "c"], ONE_NODE, 2, 8, 4).placement
    again = plan_placement(cur, ["a", "b", "c"], ONE_NODE, 2, 8, 4, load=[[5.0] * 8] * 2)
    assert again.placement == cur and again.moves == () and again.releases == ()


@pytest.mark.parametrize("replicate_hot", [False, True])
def test_replanning_with_the_same_skewed_load_moves_nothing(replicate_hot: bool) -> None:
    rng = random.Random(7)
    load = [[rng.paretovariate(1.0) for _ in range(16)] for _ in range(3)]
    cur = plan_placement(None, list("abcd"), ONE_NODE, 3, 16, 6).placement
    first = plan_placement(cur, list("abcd"), ONE_NODE, 3, 16, 6, load=load, replicate_hot=replicate_hot)
    check(first, cur, list("abcd"), 3, 16, 6, load)
    assert first.moved_experts() > 0
    second = plan_placement(first.placement, list("abcd"), ONE_NODE, 3, 16, 6, load=load,
                            replicate_hot=replicate_hot)
    assert second.moves == () and second.releases == ()


@pytest.mark.parametrize("E, n", [(12, 3), (8, 2), (8, 3), (8, 4), (64, 4), (64, 7)])
def test_scale_up_moves_about_E_over_n_plus_1_only_onto_the_new_worker(E: int, n: int) -> None:
    old_workers, new_workers = list("abcdefgh"[:n]), list("abcdefgh"[:n + 1])
    cur = plan_placement(None, old_workers, ONE_NODE, 2, E, E).placement
    plan = plan_placement(cur, new_workers, ONE_NODE, 2, E, E)
    check(plan, cur, new_workers, 2, E, E, [[1.0] * E] * 2)
    for l in range(2):
        moves = [m for m in plan.moves if m.layer == l]
        assert E // (n + 1) <= len(moves) <= -(-E // (n + 1))
        assert {m.dst for m in moves} == {new_workers[-1]}
        assert max(len(plan.placement.held_by(w)[l]) for w in new_workers) == -(-E // (n + 1))


def test_scale_down_moves_only_the_leaving_workers_experts_once() -> None:
    nodes = {"a": "n0", "b": "n0", "c": "n1", "d": "n1"}
    cur = plan_placement(None, list("abcd"), nodes, 2, 8, 4).placement
    plan = plan_placement(cur, list("abc"), nodes, 2, 8, 4)
    check(plan, cur, list("abc"), 2, 8, 4, [[1.0] * 8] * 2, nodes)
    leaving = {(l, e) for l in range(2) for e in cur.held_by("d")[l]}
    assert Counter((m.layer, m.expert) for m in plan.moves) == Counter(leaving)
    assert {m.src for m in plan.moves} == {"d"} and {m.dst for m in plan.moves} <= set("abc")
    # balance first; among equally loaded workers, c, on d's node, gets a zero-copy remap
    assert [(m.dst, m.same_node) for m in plan.moves] == [("a", False), ("c", True)] * 2
    assert set(plan.releases) == {("d", l, e) for l, e in leaving}


def test_source_prefers_the_destinations_node_else_spreads_over_holders() -> None:
    nodes = {"a": "n0", "b": "n1", "c": "n1", "d": "n2"}
    cur = Placement(("a", "b"), (((0, 1, 2, 3),), ((0, 1, 2, 3),)))  # every expert on both
    near = plan_placement(cur, ["c"], nodes, 1, 4, 4)
    check(near, cur, ["c"], 1, 4, 4, nodes=nodes)
    assert [(m.src, m.same_node) for m in near.moves] == [("b", True)] * 4
    far = plan_placement(cur, ["d"], nodes, 1, 4, 4)
    check(far, cur, ["d"], 1, 4, 4, nodes=nodes)
    assert [(m.src, m.same_node) for m in far.moves] == [("a", False), ("b", False)] * 2


def test_hot_experts_are_replicated_only_into_spare_slots() -> None:
    load = [[100.0] + [1.0] * 7]
    spare = plan_placement(None, list("abcd"), ONE_NODE, 1, 8, 4, load=load, replicate_hot=True)
    check(spare, None, list("abcd"), 1, 8, 4, load)
    replicas = len(spare.placement.holders(0, 0))
    assert replicas >= 2 and all(len(spare.placement.holders(0, e)) == 1 for e in range(1, 8))
    assert max(worker_loads(spare.placement, load, 0)) <= 107 / 4 + 100 / replicas  # mean + a
    full = plan_placement(None, list("abcd"), ONE_NODE, 1, 8, 2, load=load, replicate_hot=True)
    off = plan_placement(None, list("abcd"), ONE_NODE, 1, 8, 4, load=load, replicate_hot=False)
    for plan in (full, off):
        assert all(len(ix) == 1 for ix in plan.placement.log2phy(0).values())


def test_a_new_replica_is_copied_from_the_live_holder() -> None:
    cur = plan_placement(None, list("ab"), ONE_NODE, 1, 4, 4).placement
    plan = plan_placement(cur, list("ab"), ONE_NODE, 1, 4, 4, load=[[50, 1, 1, 1]], replicate_hot=True)
    check(plan, cur, list("ab"), 1, 4, 4, [[50, 1, 1, 1]])
    assert plan.placement.holders(0, 0) == ("a", "b")
    assert Move(0, 0, "b", "a", True) in plan.moves


def test_load_may_be_an_array() -> None:
    np = pytest.importorskip("numpy")
    load = [[5, 1, 0, 2], [0, 0, 0, 0]]
    as_list = plan_placement(None, list("ab"), ONE_NODE, 2, 4, 3, load=load, replicate_hot=True)
    as_array = plan_placement(None, list("ab"), ONE_NODE, 2, 4, 3, load=np.array(load), replicate_hot=True)
    assert as_array == as_list


def test_deterministic_and_ties_follow_worker_order() -> None:
    args = (ONE_NODE, 2, 8, 3)
    assert plan_placement(None, list("abc"), *args) == plan_placement(None, list("abc"), *args)
    one, other = plan_placement(None, list("abc"), *args), plan_placement(None, list("cba"), *args)
    assert one.placement.held_by("a") == other.placement.held_by("c")  # the first worker gets expert 0
    assert 0 in one.placement.held_by("a")[0]


def test_scale_sequence_1_2_4_3_1_stays_valid() -> None:
    L, E, S = 2, 8, 8
    cur: Placement | None = None
    for workers in (["a"], ["a", "b"], list("abcd"), list("abc"), ["a"]):
        plan = plan_placement(cur, workers, ONE_NODE, L, E, S)
        check(plan, cur, workers, L, E, S, [[1.0] * E] * L)
        for l in range(L):
            assert max(len(plan.placement.held_by(w)[l]) for w in workers) == -(-E // len(workers))
        assert cur is None or all(m.src is not None for m in plan.moves)
        cur = plan.placement
    assert cur is not None and cur.experts == ((tuple(range(E)),) * L,)


def test_last_resort_gives_reference_bins_to_the_workers_holding_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # settle never gets stuck on these inputs, so make it: only the from-scratch reference remains
    monkeypatch.setattr(pack, "settle", lambda *a, **k: None)
    cur = plan_placement(None, list("abc"), ONE_NODE, 2, 8, 3).placement
    shuffled = Placement(("c", "a", "b"), tuple(cur.held_by(w) for w in "cab"))
    plan = plan_placement(shuffled, list("cab"), ONE_NODE, 2, 8, 3)
    assert plan.moves == () and plan.placement == shuffled
    down = plan_placement(cur, list("ab"), ONE_NODE, 2, 8, 4, load=[[3, 1, 1, 1, 1, 1, 1, 1]] * 2)
    check(down, cur, list("ab"), 2, 8, 4, [[3, 1, 1, 1, 1, 1, 1, 1]] * 2)


@pytest.mark.parametrize("seed", range(12))
def test_random_chains_stay_valid_balanced_and_settled(seed: int) -> None:
    rng = random.Random(seed)
    E, L, hot = rng.choice([4, 8, 16, 32]), 2, bool(seed % 2)
    nodes = {w: f"n{i % 3}" for i, w in enumerate("abcdefgh")}
    cur: Placement | None = None
    for _ in range(5):
        workers = rng.sample("abcdefgh", rng.randint(1, 6))
        S = -(-E // len(workers)) + rng.choice([0, 0, 1, 3])
        load = [[rng.paretovariate(1.2) * rng.randint(0, 1) for _ in range(E)] for _ in range(L)]
        plan = plan_placement(cur, workers, nodes, L, E, S, load=load, replicate_hot=hot)
        uniform = [[1.0] * E if sum(row) == 0 else row for row in load]  # no load counts as uniform
        check(plan, cur, workers, L, E, S, uniform, nodes)
        again = plan_placement(plan.placement, workers, nodes, L, E, S, load=load, replicate_hot=hot)
        assert again.moves == () and again.releases == ()
        cur = plan.placement


@pytest.mark.parametrize("counts", [(3, 2, 1), (4, 3, 3, 2)])
def test_slack_keeps_uniform_load_exact(counts: tuple[int, ...]) -> None:
    # Under uniform load these are within mean +- a (a = one expert), yet one worker holds
    # ceil(E/W) + 1: the slack (below one item) still moves exactly one expert to even them out.
    E, workers = sum(counts), list("abcd"[:len(counts)])
    ids = iter(range(E))
    cur = Placement(tuple(workers), tuple(((*(next(ids) for _ in range(n)),),) for n in counts))
    plan = plan_placement(cur, workers, ONE_NODE, 1, E, E, load=[[1.0] * E])
    check(plan, cur, workers, 1, E, E, [[1.0] * E])
    assert [len(plan.placement.held_by(w)[0]) for w in workers] == [E // len(workers)] * len(workers)
    assert plan.moved_experts() == 1 and plan.moves[0].src == workers[0]


# ---- the named steps, one at a time ------------------------------------------------------------------

def test_replicate_gives_spare_slots_to_the_hottest_per_replica() -> None:
    items = pack.replicate([12, 1, 1, 6], E=4, W=3, S=2, hot=True)    # 2 spare slots, mean expert load 5
    assert items.counts == (2, 1, 1, 1) and items.p == (6.0, 1.0, 1.0, 6.0)  # 12 -> 2 x 6, then none > 10
    assert pack.replicate([12, 1, 1, 6], 4, 3, 2, hot=False).counts == (1, 1, 1, 1)
    assert pack.replicate([0, 0, 0, 0], 4, 3, 2, hot=True).p == (1.0,) * 4   # no load: uniform


def test_redundant_slots_take_a_replica_whatever_the_load() -> None:
    # uniform load: nothing is hot, yet one redundant slot replicates expert 0 (ties: lowest id)
    assert pack.replicate([1, 1, 1, 1], E=4, W=2, S=3, hot=False, redundant=1).counts == (2, 1, 1, 1)
    assert pack.replicate([1, 1, 1, 1], E=4, W=2, S=3, hot=True, redundant=1).counts == (2, 1, 1, 1)
    assert pack.replicate([1, 1, 1, 1], E=4, W=2, S=3, hot=False, redundant=5).counts == (2, 2, 1, 1)  # 2 spare
    plan = plan_placement(None, ["a", "b"], ONE_NODE, 1, 4, 3, redundant=1)
    assert plan.placement.holders(0, 0) == ("a", "b")
    with pytest.raises(ValueError, match="-1"):
        plan_placement(None, ["a", "b"], ONE_NODE, 1, 4, 3, redundant=-1)


def test_pack_fills_least_loaded_first_and_falls_back_to_dealing() -> None:
    items = pack.Items((5.0, 4.0, 3.0, 3.0, 1.0), (1,) * 5, slots=3)
    assert pack.pack(items, 2) == [[0, 3], [1, 2, 4]]                   # 5+3 = 8 = 4+3+1
    # greedy fills b's three slots with 1s, then the second replica of 3 has nowhere to go: deal
    stuck = pack.Items((1.0, 1.0, 1.0, 1.0, 3.0), (1, 1, 1, 2, 1), slots=3)
    assert pack.assign(stuck, [[], []], stuck.order(), pack.Affinity.none(2), math.inf) is None
    assert pack.pack(stuck, 2) == [[4, 1, 3], [0, 2, 3]]


def test_keep_sheds_the_item_that_leaves_a_worker_nearest_the_mean() -> None:
    items = pack.Items((4.0, 3.0, 2.0, 1.0), (1,) * 4, slots=4)
    held = (frozenset({0, 1, 2, 3}), frozenset())
    # 10 is 2 over the limit: 4, 3 and 2 each suffice; 3 leaves 7, the mean
    bins, pool = pack.keep(items, held, pack.Band(low=2.0, limit=8.0, mean=7.0, tol=0.0))
    assert pool == [1] and bins == [[3, 2, 0], []]
    # no single item covers 7 over: the largest goes, then the one that suffices
    bins, pool = pack.keep(items, held, pack.Band(low=2.0, limit=3.0, mean=7.0, tol=0.0))
    assert pool == [0, 1] and bins == [[3, 2], []]
    fresh, everything = pack.keep(items, (frozenset(), frozenset()), pack.Band(2.0, 8.0, 7.0, 0.0))
    assert fresh == [[], []] and everything == [0, 1, 2, 3]


def test_relieve_swaps_when_every_slot_is_used() -> None:
    items = pack.Items((8.0, 8.0, 1.0, 1.0), (1,) * 4, slots=2)
    assert pack.assign(items, [[0, 1], [2]], [3], pack.Affinity.none(2), limit=9.0) == [[0, 1], [2, 3]]
    assert [sorted(b) for b in pack.relieve(items, [[0, 1], [2, 3]], limit=9.0)] == [[1, 2], [0, 3]]   # 9, 9
    assert pack.relieve(pack.Items((8.0, 8.0), (1, 1), 2), [[0, 1], []], limit=7.0) is None


def test_lift_feeds_an_idle_worker_from_the_most_loaded() -> None:
    items = pack.Items((3.0, 2.0, 2.0, 1.0), (1,) * 4, slots=4)
    band = pack.Band(low=1.0, limit=5.0, mean=4.0, tol=0.0)
    assert pack.lift(items, [[0, 1], [2, 3], []], band) == [[1], [2, 3], [0]]


def test_closest_hands_each_reference_bin_to_its_biggest_holder() -> None:
    held = (frozenset({4}), frozenset({2}), frozenset({0, 1}))
    assert pack.closest([[0, 1], [2, 3], [4]], held) == [[4], [2, 3], [0, 1]]


def test_node_sharing_gives_each_worker_its_nodes_experts_and_remaps_only():
    """share_node: on one node every worker holds every expert, and the moves are remaps (the
    copies come from a holder on the same node); across nodes experts stay partitioned; a node
    holding more experts than a worker's slots leaves its workers as placed."""
    from experts.placement.share import share_on_nodes

    plan = plan_placement(None, ["a", "b"], {"a": "n0", "b": "n0"}, 2, 8, 8, share_node=True)
    assert all(plan.placement.held_by(w)[l] == tuple(range(8)) for w in "ab" for l in range(2))
    # at start each expert is read from disk once, by one worker; the other remaps that segment
    disk = {(m.layer, m.expert): m.dst for m in plan.moves if m.src is None}
    assert len(disk) == 16 and len(plan.moves) == 32
    assert all(m.same_node and m.src == disk[(m.layer, m.expert)] for m in plan.moves if m.src is not None)
    grown = plan_placement(plan.placement, ["a", "b", "c"], {"a": "n0", "b": "n0", "c": "n0"}, 2, 8, 8, share_node=True)
    assert grown.moves and all(m.same_node and m.src in ("a", "b") and m.dst == "c" for m in grown.moves)
    assert not grown.releases
    two = plan_placement(None, ["a", "b", "c"], {"a": "n0", "b": "n0", "c": "n1"}, 1, 8, 8, share_node=True)
    a, b, c = (set(two.placement.held_by(w)[0]) for w in "abc")
    assert a == b and a | c == set(range(8)) and not a & c
    assert share_on_nodes([[0, 1], [2, 3]], ["n", "n"], 3) == [[0, 1], [2, 3]]     # 4 experts, 3 slots
    assert share_on_nodes([[0, 1], [2, 3]], ["n", "n"], 4) == [[0, 1, 2, 3]] * 2


def test_prepare_remaps_what_a_node_mate_reads_from_disk_only_after_that_read() -> None:
    """server/control/receive.py's stages: disk reads and moves from existing segments first; a
    remap of a segment this same change creates waits for the second stage."""
    from server.control.receive import stages

    plan = plan_placement(None, ["a", "b"], {"a": "n0", "b": "n0"}, 2, 8, 8, share_node=True)
    now, after = stages(plan, {})
    assert {m.src for m in now} == {None} and len(now) == 16
    assert len(after) == 16 and all(m.same_node and m.src in ("a", "b") for m in after)
    grown = plan_placement(plan.placement, ["a", "b", "c"], {"a": "n0", "b": "n0", "c": "n0"}, 2, 8, 8,
                           share_node=True)
    held = {(w, l, e): f"seg-{w}-{l}-{e}" for w in "ab" for l in range(2) for e in range(8)}
    now, after = stages(grown, held)
    assert len(now) == len(grown.moves) and not after   # every source exists already
