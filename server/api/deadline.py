"""The write deadline of a stream: how long one message may wait for its client to read it.

A client that stops reading (an HTTP/2 window left at 0, a socket nobody drains) leaves the
stream's next write pending. Without a deadline its request would run to `max_tokens`, holding a
running slot and KV blocks, its outputs piling up in memory, for as long as the client keeps the
connection. With one, a write still pending after `seconds` raises `StalledReader`; the API then
cancels the request (the engine frees its slot and blocks at the next step) and ends the stream.
Both APIs (gRPC and HTTP) use it; each counts its own stalls.

One watchdog per event loop checks the pending writes every `tick` (a quarter of the deadline, at
most half a second) and cancels the stream whose write is overdue: a write then costs two dict
operations, where a timer of its own per write (`asyncio.timeout`) cost ~20 us of the API's CPU
per message, a fifth of a gRPC stream write (grpc.aio, 8 streams on loopback, 800 messages each,
three runs: 69/73/75 us per message with the watchdog, 86/114/78 with a timer per write, 72/66/95
with no deadline at all). A write is thus ended between `seconds` and `seconds + tick` after it
started.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable


class StalledReader(Exception):
    """A stream write did not complete within the write deadline: its client reads nothing."""


class _Watchdog:
    """The writes pending on one event loop, and the task that ends the overdue ones (it runs
    while any write is pending, and starts again with the next one)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, tick: float) -> None:
        self.loop = loop
        self.seconds = seconds
        self.tick = tick
        self.pending: dict[asyncio.Task, float] = {}   # writing task -> when its write started
        self.stalled: set[asyncio.Task] = set()         # cancelled by us, not by their client
        self._task: asyncio.Task | None = None

    def add(self, task: asyncio.Task) -> None:
        self.pending[task] = self.loop.time()
        if self._task is None:
            self._task = self.loop.create_task(self._watch(), name="write-deadline")

    async def _watch(self) -> None:
        try:
            while self.pending:
                await asyncio.sleep(self.tick)
                overdue = self.loop.time() - self.seconds
                for task, started in list(self.pending.items()):
                    if started <= overdue and task not in self.stalled:
                        self.stalled.add(task)
                        task.cancel()
        finally:
            self._task = None


@dataclass(frozen=True)
class WriteDeadline:
    seconds: float                  # --stream-write-timeout
    on_stall: Callable[[], None]    # counts the stall (server/metrics/'s stream_write_timeout)
    _watchdogs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.seconds < float("inf"):
            raise ValueError(f"write deadline {self.seconds!r} must be a number of seconds > 0")

    @property
    def tick(self) -> float:
        return min(0.5, self.seconds / 4)

    def _watchdog(self) -> _Watchdog:
        loop = asyncio.get_running_loop()
        dog = self._watchdogs.get(loop)
        if dog is None:
            dog = self._watchdogs[loop] = _Watchdog(loop, self.seconds, self.tick)
        return dog

    async def write(self, pending: Awaitable[None]) -> None:
        """Await one write of a stream; StalledReader (counted) if it is not done in time. The
        write itself is cancelled then, not undone: whatever the transport holds stays there."""
        dog = self._watchdog()
        task = asyncio.current_task()
        dog.add(task)
        try:
            await pending
        except asyncio.CancelledError:
            if task not in dog.stalled:
                raise   # the client went away, or the server stops: not a stall
            dog.stalled.discard(task)
            task.uncancel()
            self.on_stall()
            raise StalledReader(f"the client read nothing for {self.seconds:g} s "
                                f"(--stream-write-timeout): stream ended, request cancelled") from None
        finally:
            dog.pending.pop(task, None)
