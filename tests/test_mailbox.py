"""The engine thread's outputs reach the API's event loop in order, every one, with one wake-up of
the loop per burst rather than one per token (server/api/requests.py, LoopMailbox)."""
from __future__ import annotations

import asyncio
import threading
import time

from server.api.requests import LoopOutputs, mailbox
from server.engine.request import Output


def test_a_burst_costs_one_wake_up_and_loses_nothing():
    loop = asyncio.new_event_loop()
    box = mailbox(loop)
    drains = 0
    real_drain = box._drain

    def counted_drain() -> None:
        nonlocal drains
        drains += 1
        real_drain()

    box._drain = counted_drain   # counts how often the loop is woken for the mailbox
    streams = [LoopOutputs(loop) for _ in range(8)]
    assert all(s._box is box for s in streams) and mailbox(loop) is box

    async def main() -> list[list[int]]:
        busy = threading.Event()

        def engine() -> None:          # the engine thread: a step's tokens for every stream, 50 steps
            busy.wait()
            for step in range(50):
                for s in streams:
                    s.put(Output([step], str(step)))

        t = threading.Thread(target=engine)
        t.start()
        busy.set()
        time.sleep(0.5)                # the loop is busy meanwhile: the whole burst piles up
        t.join()
        got = []
        for s in streams:
            got.append([(await s.queue.get()).token_ids[0] for _ in range(50)])
        return got

    try:
        got = loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == [list(range(50))] * 8
    assert drains == 1, f"{drains} wake-ups of the loop for one burst of 400 outputs"


def test_a_closed_loop_drops_outputs_quietly():
    loop = asyncio.new_event_loop()
    out = LoopOutputs(loop)
    loop.close()
    out.put(Output([1], "x"))   # the API stopped: nobody reads, nothing raises
