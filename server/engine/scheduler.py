"""Continuous batching: which sequences run in the next engine step, and with how many tokens.

Pure bookkeeping (no torch, no ray), driven by the engine thread only. Each step carries every
running sequence's next decode token first, then prompt chunks (chunked prefill) up to the step's
token budget, so a long prompt never stalls the streams already running. A new request joins at
the next step when its KV blocks can be reserved; otherwise it waits, first come first served.

Admission: `max_waiting` bounds the sequences that cannot run, not the arrivals between two steps.
A sequence that the next step admits (a free running slot and free KV blocks for it, behind the
ones queued before it) never counts as waiting, so a burst into an idle server is admitted up to
`max_running` plus `max_waiting`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from memory.kv_blocks import KVBlockTable


class QueueFull(Exception):
    """The waiting queue is at its limit."""


@dataclass
class Sequence:
    seq_id: str
    prompt: list[int]
    max_tokens: int
    output: list[int] = field(default_factory=list)
    computed: int = 0        # tokens whose K/V are in the cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def kv_budget(self) -> int:
        # the last generated token is never fed back, so it needs no KV row
        return len(self.prompt) + self.max_tokens - 1


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    start: int               # first token fed this step (index into seq.tokens)
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so it yields a new token."""
        return self.start + self.num_tokens == self.seq.length


class Scheduler:
    def __init__(self, blocks: KVBlockTable, max_waiting: int, max_running: int, max_step_tokens: int) -> None:
        if max_waiting < 0 or max_running < 1 or max_step_tokens < 1:
            raise ValueError(f"max_waiting={max_waiting}, max_running={max_running}, "
                             f"max_step_tokens={max_step_tokens} out of range")
        self.blocks = blocks
        self.max_waiting = max_waiting
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}

    def fits_ever(self, seq: Sequence) -> bool:
        """Whether the whole cache could ever hold this sequence."""
        return self.blocks.blocks_for(seq.kv_budget) <= self.blocks.num_blocks

    def add(self, seq: Sequence) -> None:
        """Queue `seq`; QueueFull when it cannot run at the next step and `max_waiting` sequences
        already cannot."""
        assert self.fits_ever(seq), seq.seq_id
        runnable, slots, free = self._runnable()
        blocked = len(self.waiting) - runnable
        fits_now = blocked == 0 and slots > 0 and self.blocks.blocks_for(seq.kv_budget) <= free
        if not fits_now and blocked >= self.max_waiting:
            raise QueueFull(f"{blocked} requests waiting for a running slot or KV blocks (limit {self.max_waiting})")
        self.waiting.append(seq)

    def _runnable(self) -> tuple[int, int, int]:
        """How many waiting sequences the next step admits (first come first served, as `_admit`
        does), and the running slots and KV blocks left after them."""
        slots = self.max_running - len(self.running)
        free = self.blocks.num_free
        n = 0
        for seq in self.waiting:
            need = self.blocks.blocks_for(seq.kv_budget)
            if slots == 0 or need > free:
                break
            slots, free, n = slots - 1, free - need, n + 1
        return n, slots, free

    @property
    def capacity(self) -> int:
        """The most sequences queued and running at once: anything beyond is refused for sure."""
        return self.max_running + self.max_waiting

    def cancel(self, seq_id: str) -> bool:
        """Drop a waiting or running sequence and free its blocks. False if unknown."""
        if seq_id in self.running:
            self.finish(seq_id)
            return True
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return True
        return False

    def finish(self, seq_id: str) -> None:
        self.running.pop(seq_id, None)
        self.blocks.free(seq_id)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not self.blocks.can_reserve(seq.kv_budget):
                break  # first come first served: later ones wait behind it
            self.waiting.popleft()
            self.blocks.reserve(seq.seq_id, seq.kv_budget)
            self.running[seq.seq_id] = seq

    def schedule(self) -> list[Scheduled]:
        """The next step's work; empty when nothing can run."""
        self._admit()
        budget = self.max_step_tokens
        decodes, prefills = [], []
        for seq in self.running.values():
            if seq.computed >= len(seq.prompt):
                decodes.append(seq)
            else:
                prefills.append(seq)
        plan = []
        for seq in decodes:
            if budget == 0:
                break
            plan.append(Scheduled(seq, seq.computed, seq.length - seq.computed))
            budget -= 1
        for seq in prefills:
            if budget == 0:
                break
            n = min(len(seq.prompt) - seq.computed, budget)
            plan.append(Scheduled(seq, seq.computed, n))
            budget -= n
        return plan

    def advance(self, item: Scheduled, new_token: int | None) -> None:
        """Record that a step fed `item`'s tokens and, when it sampled, the token it produced."""
        item.seq.computed = item.start + item.num_tokens
        if new_token is not None:
            item.seq.output.append(new_token)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
