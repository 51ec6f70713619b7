"""A client that cancels, or whose deadline passes, frees its KV blocks at the engine's next step; a
request cancelled while it waits leaves the queue; the streams around them are not disturbed."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import generate, running_server

ENDLESS = 3000                     # tokens of a request that would run for many seconds
OTHERS = ([5, 17, 33], [100, 7, 9, 11, 250, 3])
OTHER_TOKENS = 120


def start(channel: grpc.Channel, request_id: str, prompt: list[int], max_tokens: int,
          timeout: float = 60.0) -> grpc.Future:
    req = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                             sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return pb_grpc.InferenceStub(channel).Generate(req, timeout=timeout)


def poll(what: str, cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def waiting_ids(engine) -> list[str]:
    return [s.seq_id for s in list(engine.scheduler.waiting)]


def wait_idle(engine) -> None:
    poll("no request holds KV blocks",
         lambda: engine.blocks.owners() == [] and engine.scheduler.num_running == 0 and engine.counts() == (0, 0))


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    # 4096 rows of KV: one endless request takes 188 of the 256 blocks
    with running_server(tiny_models["mixtral"], workers=2, kv_cache_tokens=4096) as server:
        yield server


@pytest.fixture(scope="module")
def alone(server) -> list[list[int]]:
    return [generate(server.channel, p, max_tokens=OTHER_TOKENS, ignore_eos=True)[0] for p in OTHERS]


def run_others(server, pool: ThreadPoolExecutor) -> list:
    return [pool.submit(generate, server.channel, p, max_tokens=OTHER_TOKENS, ignore_eos=True) for p in OTHERS]


def test_cancel_mid_stream_frees_blocks_at_the_next_step(server, alone):
    engine = server.engine
    with ThreadPoolExecutor(len(OTHERS)) as pool:
        stream = start(server.channel, "victim", [42, 43, 44], ENDLESS)
        got = [next(stream) for _ in range(3)]
        others = run_others(server, pool)
        assert all(len(m.token_ids) == 1 for m in got)
        assert "victim" in engine.blocks.owners()
        steps = engine.steps
        stream.cancel()
        poll("the victim's blocks are free", lambda: "victim" not in engine.blocks.owners())
        assert "victim" not in engine.scheduler.running and "victim" not in waiting_ids(engine)
        # freed as soon as the cancel reached the engine, not when the request would have ended
        assert engine.steps - steps < 100
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert [f.result()[0] for f in others] == alone
    wait_idle(engine)


def test_deadline_exceeded_frees_blocks(server, alone):
    engine = server.engine
    with ThreadPoolExecutor(len(OTHERS)) as pool:
        others = run_others(server, pool)
        stream = start(server.channel, "late", [42, 43, 44], ENDLESS, timeout=0.5)
        n = 0
        with pytest.raises(grpc.RpcError) as err:
            for msg in stream:
                n += len(msg.token_ids)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0 < n < ENDLESS
        poll("the late request's blocks are free", lambda: "late" not in engine.blocks.owners())
        assert "late" not in engine.scheduler.running
        assert [f.result()[0] for f in others] == alone
    wait_idle(engine)


def test_cancel_while_waiting_leaves_the_queue(server, alone):
    engine = server.engine
    hog = start(server.channel, "hog", [42, 43, 44], ENDLESS)
    next(hog)
    # needs 94 blocks, 68 are free: it waits at the head of the queue
    queued = start(server.channel, "queued", [50, 51, 52], 1500)
    poll("the request waits", lambda: "queued" in waiting_ids(engine))
    with ThreadPoolExecutor(1) as pool:
        # small enough to fit, but first come first served: it waits behind "queued"
        behind = pool.submit(generate, server.channel, OTHERS[0], max_tokens=OTHER_TOKENS, ignore_eos=True)
        poll("the second one waits too", lambda: engine.scheduler.num_waiting == 2)
        queued.cancel()
        poll("the cancelled request has left the queue", lambda: "queued" not in waiting_ids(engine))
        assert "queued" not in engine.blocks.owners()
        # the queue moves on while the hog still runs
        assert behind.result()[0] == alone[0]
    assert "hog" in engine.blocks.owners()
    with pytest.raises(grpc.RpcError) as err:
        next(queued)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    hog.cancel()
    wait_idle(engine)


def test_reusing_a_request_id_right_after_its_stream_ends(server, alone):
    """The end of a stream must not cancel a later request that reuses its id."""
    for _ in range(50):
        tokens = []
        for msg in start(server.channel, "again", OTHERS[0], 4):
            tokens += msg.token_ids
            if msg.finish_reason:
                break       # the next request goes out before the old RPC's status arrives
        assert msg.finish_reason == pb.FINISH_REASON_LENGTH and tokens == alone[0][:4]
    wait_idle(server.engine)
