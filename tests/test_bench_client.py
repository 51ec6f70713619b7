"""The benchmarks' streaming client (`server.bench.common.run_batch`): every stream on one asyncio
loop in a thread of its own, each token timed as it arrives, its niceness confined to that thread."""
from __future__ import annotations

import os
import threading

from server.bench.common import run_batch
from tests.conftest import generate, running_server


def test_run_batch_streams_every_prompt_whole_and_keeps_its_niceness_to_itself(tiny_models, ray_local):
    prompts = [[5, 6, 7], [9, 8], [11, 12, 13, 14]]
    with running_server(tiny_models["mixtral"], workers=1) as server:
        expected = [generate(server.channel, p, max_tokens=6, ignore_eos=True)[0] for p in prompts]
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        wall, logs = run_batch(f"127.0.0.1:{server.port}", prompts, 6, nice=mine + 3)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    assert wall > 0 and [log.error for log in logs] == ["", "", ""]
    assert [log.tokens for log in logs] == expected
    assert all(len(log.times) == 6 and log.times == sorted(log.times) and log.times[0] >= log.start for log in logs)
