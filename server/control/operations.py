"""Operations: every change of topology as an operation with an id, phases and their timings.

An orchestrator whose Scale call timed out cannot tell whether the change ran. So each change is an
*operation*: the caller may name it (`operation_id`), a retry with the same id returns that same
operation (waiting for it, or its outcome) and never starts a second change, and anyone can read or
follow its phases:

    planned -> preparing -> committing -> releasing -> done        (or -> aborted, before the commit)

`planned` means accepted: the change holds the controller's lock and its target fits the cluster.
A change refused before that (another one running, a target the cluster cannot hold, a bad value)
leaves no operation behind, so the same id can be retried later.

The registry is bookkeeping (no torch, no ray): the controller reports phases through a callback,
watchers wait on one condition variable, and the history is bounded (running operations are never
dropped). The runner runs each change on its own thread so a caller may return once it is planned.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from server.control.topology import ChangeReport

PLANNED, PREPARING, COMMITTING, RELEASING, DONE, ABORTED = (
    "planned", "preparing", "committing", "releasing", "done", "aborted")
PHASES = (PLANNED, PREPARING, COMMITTING, RELEASING, DONE, ABORTED)
FINAL = (DONE, ABORTED)
KINDS = ("scale", "rebalance")
MAX_ID_LENGTH = 128

PhaseReport = Callable[[str], None]                     # what the controller calls as a change moves on
Change = Callable[[PhaseReport], "ChangeReport"]        # runs one change, reporting its phases


@dataclass(frozen=True)
class PhaseMark:
    phase: str
    start: float                  # wall clock (time.time()) when the phase began
    end: float | None = None      # None while it is the current phase; final phases end as they begin


@dataclass(frozen=True)
class Operation:
    """A snapshot of one operation; the registry replaces it on every change (`seq` grows)."""
    operation_id: str
    kind: str                     # scale | rebalance
    target: int                   # workers after the change
    created: float                # wall clock
    phases: tuple[PhaseMark, ...] = ()
    error: str = ""               # why it aborted
    report: "ChangeReport | None" = None   # once done
    seq: int = 0                  # registry-wide update number of this snapshot

    @property
    def phase(self) -> str:
        """The current phase; "" while accepted but not yet planned."""
        return self.phases[-1].phase if self.phases else ""

    @property
    def final(self) -> bool:
        return self.phase in FINAL


class OperationAborted(RuntimeError):
    """A retry (or a wait) found its operation aborted before the commit; the old topology serves on."""

    def __init__(self, op: Operation) -> None:
        super().__init__(f"operation {op.operation_id} ({op.kind} to {op.target} workers) aborted: {op.error}")
        self.operation = op


class OperationRegistry:
    def __init__(self, history: int = 64, clock: Callable[[], float] = time.time) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.history = history
        self.clock = clock
        self._cond = threading.Condition()
        self._ops: OrderedDict[str, Operation] = OrderedDict()   # oldest first
        self._refused: dict[str, BaseException] = {}             # id -> why, until the id is reused
        self._seq = 0

    # -- writers ------------------------------------------------------------------------------
    def open(self, operation_id: str, kind: str, target: int) -> tuple[Operation, bool]:
        """The operation with this id, or a new one: (operation, created). ValueError when the id
        is malformed or names an operation that asked for something else."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        if not operation_id or len(operation_id) > MAX_ID_LENGTH or not operation_id.isprintable():
            raise ValueError(f"operation_id {operation_id[:MAX_ID_LENGTH + 8]!r} must be 1 to {MAX_ID_LENGTH} "
                             "printable characters")
        with self._cond:
            op = self._ops.get(operation_id)
            if op is not None:
                # a rebalance keeps the worker count of its time: a retry after a scale is the same one
                if op.kind != kind or (kind == "scale" and op.target != target):
                    raise ValueError(f"operation_id {operation_id!r} is a {op.kind} to {op.target} workers; "
                                     f"this request asks for a {kind} to {target}")
                return op, False
            self._refused.pop(operation_id, None)
            op = self._put(Operation(operation_id, kind, target, self.clock()))
            self._evict()
            return op, True

    def enter(self, operation_id: str, phase: str, error: str = "", report: "ChangeReport | None" = None) -> None:
        """The operation moves on to `phase` (phases only go forward; a final one is the last)."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
        with self._cond:
            op = self._ops[operation_id]
            assert not op.final, f"operation {operation_id} is already {op.phase}"
            assert op.phase == "" or PHASES.index(phase) > PHASES.index(op.phase), (op.phase, phase)
            now = self.clock()
            marks = op.phases[:-1] + (replace(op.phases[-1], end=now),) if op.phases else ()
            final = phase in FINAL
            self._put(replace(op, phases=marks + (PhaseMark(phase, now, now if final else None),),
                              error=error or op.error, report=report or op.report))
            if final:
                self._evict()

    def forget(self, operation_id: str, why: BaseException) -> None:
        """A change refused before it was planned: drop it, so the id may be used again."""
        with self._cond:
            op = self._ops.get(operation_id)
            assert op is not None and op.phase == "", f"only an unplanned operation is forgotten, not {op}"
            del self._ops[operation_id]
            self._refused[operation_id] = why
            while len(self._refused) > self.history:
                self._refused.pop(next(iter(self._refused)))
            self._seq += 1
            self._cond.notify_all()

    # -- readers ------------------------------------------------------------------------------
    def get(self, operation_id: str) -> Operation | None:
        with self._cond:
            return self._ops.get(operation_id)

    def recent(self) -> list[Operation]:
        """Every operation kept, oldest first."""
        with self._cond:
            return list(self._ops.values())

    def wait(self, operation_id: str, ready: Callable[[Operation], bool],
             timeout: float | None = None) -> Operation | BaseException | None:
        """Block until the operation is `ready`; returns it, or why it was refused, or None when
        the id is unknown (or on time-out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                op = self._ops.get(operation_id)
                if op is None:
                    return self._refused.get(operation_id)
                if ready(op):
                    return op
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def updates(self, after: int, timeout: float) -> tuple[list[Operation], int]:
        """Snapshots newer than update number `after` (waiting up to `timeout` for one), and the
        number to pass next time. A watcher that falls behind sees each operation's latest state."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after, timeout)
            return [op for op in self._ops.values() if op.seq > after], self._seq

    @property
    def seq(self) -> int:
        with self._cond:
            return self._seq

    # -- internals ----------------------------------------------------------------------------
    def _put(self, op: Operation) -> Operation:
        self._seq += 1
        op = replace(op, seq=self._seq)
        self._ops[op.operation_id] = op
        self._cond.notify_all()
        return op

    def _evict(self) -> None:
        """Keep at most `history` operations: the oldest finished ones go first, running ones stay."""
        for op_id in [o.operation_id for o in self._ops.values() if o.final][:max(0, len(self._ops) - self.history)]:
            del self._ops[op_id]


class OperationRunner:
    """Runs changes as operations, each on its own thread, so a caller may wait for the end or
    only until the change is planned."""

    def __init__(self, registry: OperationRegistry) -> None:
        self.registry = registry

    def run(self, kind: str, target: int, change: Change, operation_id: str = "", wait: bool = True) -> Operation:
        """Start `change` as operation `operation_id` (or join the operation of that id) and return
        it once planned (`wait=False`) or final. Raises what refused the change before it was
        planned; with `wait`, what aborted it (the original exception for the caller that started
        it, OperationAborted for a retry)."""
        op, created = self.registry.open(operation_id or uuid.uuid4().hex, kind, target)
        failure: list[BaseException] = []
        if created:
            threading.Thread(target=self._run, args=(op.operation_id, change, failure),
                             name=f"operation-{op.operation_id[:12]}", daemon=True).start()
        got = self.registry.wait(op.operation_id, (lambda o: o.final) if wait else (lambda o: o.phase != ""))
        if got is None:
            raise RuntimeError(f"operation {op.operation_id} vanished from the registry")
        if isinstance(got, BaseException):
            raise got
        if wait and got.phase == ABORTED:
            raise failure[0] if failure else OperationAborted(got)
        return got

    def _run(self, op_id: str, change: Change, failure: list[BaseException]) -> None:
        reg = self.registry
        try:
            report = change(lambda phase: reg.enter(op_id, phase))
        except BaseException as exc:  # noqa: BLE001  (recorded on the operation; the thread ends)
            op = reg.get(op_id)
            if op is not None and op.phase == "":
                reg.forget(op_id, exc)
            else:
                failure.append(exc)   # before the abort is visible, so the waiting creator sees it
                reg.enter(op_id, ABORTED, error=str(exc) or type(exc).__name__)
            return
        reg.enter(op_id, DONE, report=report)
