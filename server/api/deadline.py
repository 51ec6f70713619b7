"""The write deadline of a stream: how long one message may wait for its client to read it.

A client that stops reading (an HTTP/2 window left at 0, a socket nobody drains) leaves the
stream's next write pending. Without a deadline its request would run to `max_tokens`, holding a
running slot and KV blocks, its outputs piling up in memory, for as long as the client keeps the
connection. With one, a write still pending after `seconds` raises `StalledReader`; the API then
cancels the request (the engine frees its slot and blocks at the next step) and ends the stream.
Both APIs (gRPC and HTTP) use it; each counts its own stalls.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable


class StalledReader(Exception):
    """A stream write did not complete within the write deadline: its client reads nothing."""


@dataclass(frozen=True)
class WriteDeadline:
    seconds: float                  # --stream-write-timeout
    on_stall: Callable[[], None]    # counts the stall (server/metrics/'s stream_write_timeout)

    def __post_init__(self) -> None:
        if not 0 < self.seconds < float("inf"):
            raise ValueError(f"write deadline {self.seconds!r} must be a number of seconds > 0")

    async def write(self, pending: Awaitable[None]) -> None:
        """Await one write of a stream; StalledReader (counted) if it is not done in time. The
        write itself is cancelled then, not undone: whatever the transport holds stays there."""
        try:
            async with asyncio.timeout(self.seconds):
                await pending
        except TimeoutError:
            self.on_stall()
            raise StalledReader(f"the client read nothing for {self.seconds:g} s "
                                f"(--stream-write-timeout): stream ended, request cancelled") from None
