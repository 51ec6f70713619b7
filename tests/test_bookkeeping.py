"""The KV block table and the scheduler are pure bookkeeping: tiny hand-made inputs and invariants,
and a fresh interpreter shows that importing them (and the placement planner) pulls in no torch or ray."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memory.kv_blocks import KVBlockTable
from server.engine.scheduler import QueueFull, Scheduler, Sequence

ROOT = Path(__file__).resolve().parents[1]


def check_table(table: KVBlockTable) -> None:
    """Every block is either free or owned by exactly one sequence."""
    owned = [b for seq in table.owners() for b in table.blocks(seq)]
    free = table._free
    assert sorted(owned + free) == list(range(table.num_blocks))
    assert table.num_free == len(free)


# -- KVBlockTable -------------------------------------------------------------------------------

def test_reserve_and_free():
    table = KVBlockTable(num_blocks=8, block_size=4)
    assert table.blocks_for(1) == 1 and table.blocks_for(4) == 1 and table.blocks_for(9) == 3
    a = table.reserve("a", 9)
    b = table.reserve("b", 4)
    assert len(a) == 3 and len(b) == 1 and not set(a) & set(b)
    assert table.blocks("a") == a and sorted(table.owners()) == ["a", "b"]
    assert table.num_free == 4 and table.usage == pytest.approx(0.5)
    check_table(table)
    assert table.free("a") == 3
    assert table.num_free == 7 and table.owners() == ["b"]
    check_table(table)
    assert table.free("b") == 1
    assert table.num_free == 8 and table.usage == 0.0 and table.owners() == []
    check_table(table)


def test_no_double_free():
    table = KVBlockTable(num_blocks=4, block_size=2)
    table.reserve("a", 5)
    assert table.free("a") == 3
    assert table.free("a") == 0          # a second free gives nothing back
    assert table.free("never-seen") == 0
    assert table.num_free == 4
    check_table(table)                  # no block twice in the free list
    # all four blocks can be handed out again, each once
    assert sorted(table.reserve("b", 8)) == [0, 1, 2, 3]


def test_can_reserve_and_refusals_change_nothing():
    table = KVBlockTable(num_blocks=4, block_size=4)
    assert table.can_reserve(16) and not table.can_reserve(17)
    table.reserve("a", 10)               # 3 blocks
    assert table.can_reserve(4) and not table.can_reserve(5)
    with pytest.raises(RuntimeError, match="needs 2 KV blocks, 1 free"):
        table.reserve("b", 5)
    with pytest.raises(RuntimeError, match="already owns"):
        table.reserve("a", 1)
    assert table.owners() == ["a"] and table.num_free == 1
    check_table(table)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0)])
def test_table_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match=f"num_blocks={num_blocks}"):
        KVBlockTable(num_blocks, block_size)


# -- Scheduler ----------------------------------------------------------------------------------

def seq(name: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(name, list(range(prompt_len)), max_tokens)


def run_step(sched: Scheduler, token: int = 7) -> list[tuple[str, int, int]]:
    """One engine step without a model: feed the plan, sample `token` where a step samples."""
    plan = sched.schedule()
    for item in plan:
        sched.advance(item, token if item.samples else None)
    return [(item.seq.seq_id, item.start, item.num_tokens) for item in plan]


def test_kv_budget_covers_prompt_and_all_but_the_last_token():
    s = seq("a", 5, 4)
    assert s.kv_budget == 8
    sched = Scheduler(KVBlockTable(2, 4), max_waiting=4, max_running=4, max_step_tokens=64)
    assert sched.fits_ever(s)
    assert not sched.fits_ever(seq("b", 5, 5))   # 9 rows > 2 blocks of 4


def test_fifo_admission_up_to_max_running():
    blocks = KVBlockTable(64, 4)
    sched = Scheduler(blocks, max_waiting=8, max_running=2, max_step_tokens=64)
    for name in "abc":
        sched.add(seq(name, 3, 2))
    plan = run_step(sched)
    assert [p[0] for p in plan] == ["a", "b"]
    assert sched.num_running == 2 and [s.seq_id for s in sched.waiting] == ["c"]
    assert sorted(blocks.owners()) == ["a", "b"]          # blocks only for the admitted
    sched.finish("a")
    run_step(sched)
    assert sorted(sched.running) == ["b", "c"] and sched.num_waiting == 0


def test_head_of_line_waits_when_blocks_are_short():
    blocks = KVBlockTable(4, 4)                           # 16 token rows
    sched = Scheduler(blocks, max_waiting=8, max_running=8, max_step_tokens=64)
    sched.add(seq("a", 4, 5))                             # 8 rows: 2 blocks
    sched.add(seq("big", 8, 5))                           # 12 rows: 3 blocks, 2 free
    sched.add(seq("small", 1, 1))                         # 1 block: would fit, but waits its turn
    run_step(sched)
    assert list(sched.running) == ["a"]
    assert [s.seq_id for s in sched.waiting] == ["big", "small"]
    assert blocks.owners() == ["a"]
    sched.finish("a")
    run_step(sched)
    assert list(sched.running) == ["big", "small"] and sched.num_waiting == 0
    check_table(blocks)


def test_chunked_prefill_respects_step_budget_and_decodes_go_first():
    blocks = KVBlockTable(64, 4)
    sched = Scheduler(blocks, max_waiting=8, max_running=8, max_step_tokens=8)
    sched.add(seq("a", 3, 10))
    assert run_step(sched) == [("a", 0, 3)]               # whole prompt, samples the first token
    sched.add(seq("long", 20, 4))
    steps = [run_step(sched) for _ in range(3)]
    # a's one decode token comes first; the long prompt gets the rest of the budget, chunk by chunk
    assert steps[0] == [("a", 3, 1), ("long", 0, 7)]
    assert steps[1] == [("a", 4, 1), ("long", 7, 7)]
    assert steps[2] == [("a", 5, 1), ("long", 14, 6)]
    for step in steps:
        assert sum(n for _, _, n in step) <= 8
    assert sched.running["long"].output == [7]            # only the last chunk sampled
    assert sched.running["long"].computed == 20
    assert run_step(sched) == [("a", 6, 1), ("long", 20, 1)]


def test_decodes_alone_can_fill_the_budget():
    sched = Scheduler(KVBlockTable(64, 4), max_waiting=8, max_running=8, max_step_tokens=2)
    for name in "abc":
        sched.add(seq(name, 1, 5))
    assert run_step(sched) == [("a", 0, 1), ("b", 0, 1)]
    assert run_step(sched) == [("a", 1, 1), ("b", 1, 1)]  # c's prompt waits: no budget left
    sched.finish("a")
    assert run_step(sched) == [("b", 2, 1), ("c", 0, 1)]


def test_cancel_waiting_and_running():
    blocks = KVBlockTable(16, 4)
    sched = Scheduler(blocks, max_waiting=8, max_running=1, max_step_tokens=64)
    sched.add(seq("run", 4, 4))
    sched.add(seq("wait", 4, 4))
    run_step(sched)
    assert list(sched.running) == ["run"] and blocks.owners() == ["run"]
    assert sched.cancel("wait") is True
    assert sched.num_waiting == 0 and blocks.owners() == ["run"]
    assert sched.cancel("run") is True
    assert sched.num_running == 0 and blocks.owners() == [] and blocks.num_free == 16
    assert sched.cancel("run") is False and sched.cancel("nobody") is False
    assert sched.schedule() == []
    check_table(blocks)


def test_queue_full_counts_only_what_cannot_run():
    """max_waiting bounds the sequences the next step cannot admit, not arrivals between steps."""
    sched = Scheduler(KVBlockTable(16, 4), max_waiting=2, max_running=1, max_step_tokens=64)
    sched.add(seq("a", 1, 1))       # the next step runs it: not waiting
    sched.add(seq("b", 1, 1))       # no running slot left: waiting (1)
    sched.add(seq("c", 1, 1))       # waiting (2)
    with pytest.raises(QueueFull, match="limit 2"):
        sched.add(seq("d", 1, 1))
    assert [s.seq_id for s in sched.waiting] == ["a", "b", "c"]
    run_step(sched)                 # a runs; b and c still cannot
    with pytest.raises(QueueFull, match="limit 2"):
        sched.add(seq("d", 1, 1))
    sched.finish("a")               # a slot frees: b runs at the next step, only c waits
    sched.add(seq("d", 1, 1))
    assert [s.seq_id for s in sched.waiting] == ["b", "c", "d"]


def test_queue_full_when_kv_blocks_are_short():
    """A free running slot is not enough: a sequence whose KV blocks do not fit waits."""
    sched = Scheduler(KVBlockTable(4, 4), max_waiting=1, max_running=8, max_step_tokens=64)
    sched.add(seq("a", 12, 1))      # 3 of the 4 blocks: runs at the next step
    sched.add(seq("b", 8, 1))       # 2 blocks: cannot run beside a -> waiting (1)
    with pytest.raises(QueueFull, match="limit 1"):
        sched.add(seq("c", 1, 1))


@pytest.mark.parametrize("kwargs", [dict(max_waiting=-1), dict(max_running=0), dict(max_step_tokens=0)])
def test_scheduler_rejects_bad_limits(kwargs):
    limits = dict(max_waiting=1, max_running=1, max_step_tokens=1) | kwargs
    with pytest.raises(ValueError, match="out of range"):
        Scheduler(KVBlockTable(4, 4), **limits)


# -- no devices in the bookkeeping --------------------------------------------------------------

def test_bookkeeping_imports_neither_torch_nor_ray():
    code = ("import sys; import server.engine.scheduler, memory.kv_blocks, experts.placement.planner; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
