"""The write deadline's watchdog: a write pending past the deadline ends its stream with
StalledReader (counted once), a write done in time costs nothing after it, and a stream cancelled by
its client is never counted as a stall. The served behaviour (gRPC and HTTP readers that stop
reading) is tests/test_slow_reader.py's."""
from __future__ import annotations

import asyncio

import pytest

from server.api.deadline import StalledReader, WriteDeadline


def _deadline(seconds: float = 0.2) -> tuple[WriteDeadline, list[int]]:
    stalls: list[int] = []
    return WriteDeadline(seconds, lambda: stalls.append(1)), stalls


def test_a_write_pending_past_the_deadline_ends_its_stream_and_counts_once():
    deadline, stalls = _deadline(0.2)

    async def main() -> float:
        never = asyncio.get_running_loop().create_future()   # a write its client never reads
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(StalledReader, match="read nothing for 0.2 s"):
            async with asyncio.timeout(5):                 # no watchdog: TimeoutError, not a hang
                await deadline.write(never)
        waited = asyncio.get_running_loop().time() - t0
        assert never.cancelled()                           # the write itself was cancelled
        await deadline.write(asyncio.sleep(0.01))          # the same task writes on: no cancel left over
        await asyncio.sleep(3 * deadline.tick)             # and none arrives late
        return waited

    waited = asyncio.run(main())
    assert 0.2 <= waited <= 0.2 + deadline.tick + 0.2, waited
    assert stalls == [1]


def test_writes_done_in_time_leave_nothing_behind():
    deadline, stalls = _deadline(0.2)

    async def main() -> None:
        async def stream() -> None:
            for _ in range(20):
                await deadline.write(asyncio.sleep(0.02))   # each in time; 0.4 s in all, past the deadline
        await asyncio.gather(*(stream() for _ in range(8)))
        dog = deadline._watchdogs[asyncio.get_running_loop()]
        assert dog.pending == {} and dog.stalled == set()
        await asyncio.sleep(2 * deadline.tick)
        assert dog._task is None                            # the watchdog rests while nothing is pending

    asyncio.run(main())
    assert stalls == []


def test_a_stream_its_client_cancels_is_not_a_stall():
    deadline, stalls = _deadline(0.2)

    async def main() -> None:
        never = asyncio.get_running_loop().create_future()
        writer = asyncio.ensure_future(deadline.write(never))
        await asyncio.sleep(0.05)
        writer.cancel()                                     # the client went away mid-write
        with pytest.raises(asyncio.CancelledError):
            await writer
        await asyncio.sleep(0.2 + 2 * deadline.tick)

    asyncio.run(main())
    assert stalls == []


def test_only_the_overdue_stream_ends():
    deadline, stalls = _deadline(0.2)

    async def main() -> list[str]:
        async def stalled() -> str:
            try:
                async with asyncio.timeout(5):
                    await deadline.write(asyncio.get_running_loop().create_future())
            except StalledReader:
                return "stalled"
            return "done"

        async def reading() -> str:
            for _ in range(30):
                await deadline.write(asyncio.sleep(0.02))
            return "done"

        return await asyncio.gather(stalled(), reading(), reading())

    assert asyncio.run(main()) == ["stalled", "done", "done"]
    assert stalls == [1]


def test_a_deadline_must_be_a_positive_number_of_seconds():
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="must be a number of seconds > 0"):
            WriteDeadline(bad, lambda: None)


def test_the_api_loop_ends_the_watchdog_when_the_server_stops(tiny_models):
    """A stream's writes start the watchdog on the gRPC loop; stopping the front ends every task
    left there (as asyncio.run would), so none is reported "destroyed but pending" at exit."""
    from tests.conftest import generate, running_server

    with running_server(tiny_models["mixtral"], workers=1) as server:
        tokens, _, _ = generate(server.channel, [5, 17, 33], max_tokens=8, ignore_eos=True)
        assert len(tokens) == 8
        loop = server.front.loop
        server.front.stop(grace=1)
        assert not server.front._thread.is_alive()
        assert [t for t in asyncio.all_tasks(loop) if not t.done()] == []
