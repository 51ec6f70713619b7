"""Bad requests get INVALID_ARGUMENT naming the field, a full queue RESOURCE_EXHAUSTED; neither
disturbs the requests being served, and nothing is left holding KV blocks afterwards."""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import generate, running_server

MAX_LEN = 256            # the server's context (max_model_len override)
PROMPT = [5, 17, 33]
LONG = 240               # tokens of the well-behaved stream: it is still running while the bad ones come


def ok(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(**({"max_tokens": 4} | kw))


# (case, request, a word the error must name)
BAD = [
    ("empty prompt", pb.GenerateRequest(prompt="", sampling=ok()), "prompt"),
    ("neither prompt nor ids", pb.GenerateRequest(request_id="x", sampling=ok()), "prompt_token_ids"),
    ("both prompt and ids", pb.GenerateRequest(prompt="hello", prompt_token_ids=PROMPT, sampling=ok()),
     "prompt_token_ids"),
    ("id = vocab size", pb.GenerateRequest(prompt_token_ids=[5, 512], sampling=ok()), "prompt_token_ids"),
    ("id = 2**32-1", pb.GenerateRequest(prompt_token_ids=[2**32 - 1], sampling=ok()), "prompt_token_ids"),
    ("prompt + max_tokens > context",
     pb.GenerateRequest(prompt_token_ids=list(range(10)), sampling=ok(max_tokens=MAX_LEN - 9)), "max_tokens"),
    ("prompt alone > context",
     pb.GenerateRequest(prompt_token_ids=[7] * (MAX_LEN + 1), sampling=ok(max_tokens=1)), "max_tokens"),
    ("max_tokens 0", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(max_tokens=0)), "max_tokens"),
    ("missing sampling", pb.GenerateRequest(prompt_token_ids=PROMPT), "sampling"),
    ("temperature < 0", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(temperature=-0.5)), "temperature"),
    ("temperature NaN", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(temperature=math.nan)),
     "temperature"),
    ("top_p > 1", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(top_p=1.5)), "top_p"),
    ("top_p < 0", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(top_p=-0.1)), "top_p"),
    ("top_p NaN", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(top_p=math.nan)), "top_p"),
    ("temperature +inf", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(temperature=math.inf)),
     "temperature"),
    ("temperature -inf", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(temperature=-math.inf)),
     "temperature"),
    # a client's top_k=-1 arrives as 2**32-1 on the uint32: refused, not silently "off"
    ("top_k = 2**32-1", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(top_k=2**32 - 1)), "top_k"),
    ("top_k > vocab", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(top_k=513)), "top_k"),
    ("empty stop string", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(stop=["a", ""])), "stop"),
    ("17 stop strings", pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=ok(stop=["s"] * 17)), "stop"),
]


def error_of(channel: grpc.Channel, request: pb.GenerateRequest) -> grpc.RpcError | None:
    """Run one request to its end; the error it ended with, None if it completed."""
    try:
        for _ in pb_grpc.InferenceStub(channel).Generate(request, timeout=30):
            pass
    except grpc.RpcError as exc:
        return exc
    return None


def wait_idle(server, timeout: float = 10.0) -> None:
    """Bounded poll: every stream has ended and given its KV blocks back."""
    engine = server.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.blocks.owners() == [] and engine.scheduler.num_running == 0 and engine.counts() == (0, 0):
            return
        time.sleep(0.02)
    raise AssertionError(f"still owning KV blocks: {engine.blocks.owners()}, counts {engine.counts()}")


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=1, max_model_len=MAX_LEN) as server:
        yield server


@pytest.fixture(scope="module")
def alone(server) -> list[int]:
    tokens, _, last = generate(server.channel, PROMPT, max_tokens=LONG, ignore_eos=True)
    assert len(tokens) == LONG and last.finish_reason == pb.FINISH_REASON_LENGTH
    return tokens


@pytest.mark.parametrize("case, request_, field", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_invalid_argument_naming_the_field(server, case, request_, field):
    err = error_of(server.channel, request_)
    assert err is not None, f"{case}: accepted"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.code(), err.details())
    assert field in err.details(), (case, err.details())


def test_top_k_zero_is_fine(server):
    tokens, _, last = generate(server.channel, PROMPT, max_tokens=4, temperature=0.7, top_k=0, seed=1)
    assert len(tokens) == 4 and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_top_k_up_to_the_vocabulary_is_fine(server):
    tokens, _, last = generate(server.channel, PROMPT, max_tokens=4, temperature=0.7, top_k=512, seed=1)
    assert len(tokens) == 4 and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_prompt_that_just_fits_the_context(server):
    tokens, _, last = generate(server.channel, list(range(10)), max_tokens=MAX_LEN - 10, ignore_eos=True)
    assert len(tokens) == MAX_LEN - 10


def test_bad_requests_do_not_disturb_a_running_stream(server, alone):
    stub = pb_grpc.InferenceStub(server.channel)
    req = pb.GenerateRequest(request_id="steady", prompt_token_ids=PROMPT,
                             sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True))
    stream = stub.Generate(req, timeout=60)
    first = next(stream)
    tokens = list(first.token_ids)
    for case, bad, _ in BAD:
        err = error_of(server.channel, bad)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert "steady" in server.engine.blocks.owners()   # the bad ones really came while it streamed
    for msg in stream:
        tokens += msg.token_ids
    assert msg.finish_reason == pb.FINISH_REASON_LENGTH
    assert tokens == alone
    wait_idle(server)


def test_request_id_in_use_is_refused_and_disturbs_nothing(server, alone):
    stub = pb_grpc.InferenceStub(server.channel)
    req = pb.GenerateRequest(request_id="twice", prompt_token_ids=PROMPT,
                             sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True))
    stream = stub.Generate(req, timeout=60)
    tokens = list(next(stream).token_ids)
    err = error_of(server.channel, req)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in err.details()
    for msg in stream:
        tokens += msg.token_ids
    assert tokens == alone
    wait_idle(server)
    # once the first has ended, the id may be used again
    again, _, _ = generate(server.channel, PROMPT, max_tokens=8, ignore_eos=True)
    assert again == alone[:8]


def test_full_queue_is_resource_exhausted_and_accepted_ones_complete(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=1, max_waiting=1, max_running=1,
                        kv_cache_tokens=512) as small:
        want, _, _ = generate(small.channel, PROMPT, max_tokens=200, ignore_eos=True)

        def one(_):
            try:
                return generate(small.channel, PROMPT, max_tokens=200, ignore_eos=True, timeout=60)[0]
            except grpc.RpcError as exc:
                return exc

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, range(6)))
        rejected = [r for r in results if isinstance(r, grpc.RpcError)]
        served = [r for r in results if not isinstance(r, grpc.RpcError)]
        assert rejected, "no request was refused"
        for err in rejected:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
            assert "queue full" in err.details()
        assert served and all(tokens == want for tokens in served)
        wait_idle(small)
        # and it serves on
        assert generate(small.channel, PROMPT, max_tokens=200, ignore_eos=True)[0] == want
        wait_idle(small)


def test_nothing_left_behind(server):
    wait_idle(server)
    assert server.engine.scheduler.num_waiting == 0
    assert server.engine.blocks.num_free == server.engine.blocks.num_blocks


def test_a_burst_into_an_idle_server_is_admitted_up_to_running_plus_waiting(tiny_models, ray_local):
    """--max-waiting bounds requests that cannot run, not arrivals between two engine steps: 100 at
    once into an idle server with 64 running slots and 8 waiting places admit 64 + 8; the rest are
    RESOURCE_EXHAUSTED; every admitted one completes."""
    with running_server(tiny_models["mixtral"], workers=1, max_waiting=8, max_running=64,
                        kv_cache_tokens=8192) as burst:   # 64 x (3 + 24 tokens) fit the cache
        want, _, _ = generate(burst.channel, PROMPT, max_tokens=24, ignore_eos=True)
        wait_idle(burst)
        go = threading.Barrier(100)

        def one(_):
            go.wait()
            try:
                return generate(burst.channel, PROMPT, max_tokens=24, ignore_eos=True, timeout=120)[0]
            except grpc.RpcError as exc:
                return exc

        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(one, range(100)))
        served = [r for r in results if not isinstance(r, grpc.RpcError)]
        refused = [r for r in results if isinstance(r, grpc.RpcError)]
        print(f"\n100 at once, max_running 64, max_waiting 8: {len(served)} served, {len(refused)} refused")
        assert len(served) >= 64 + 8, [(e.code(), e.details()) for e in refused[:3]]
        assert all(tokens == want for tokens in served)
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
        wait_idle(burst)
