"""Sampling: parameters checked with errors naming the field; greedy takes the largest logit; a seed makes a stream
reproducible over gRPC, also beside other requests; top_k=1 is greedy whatever the temperature; sampled
frequencies follow temperature, top-k and top-p."""
from __future__ import annotations

import math

import grpc
import pytest
import torch

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.engine.sampling import Sampler, SamplingParams
from tests.conftest import generate, running_server

PROMPT = [5, 17, 33, 250, 8]
N = 32
SEEDED = dict(temperature=0.8, top_p=0.9, top_k=20)


# -- SamplingParams and Sampler -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(stop=("ok", "")), "stop"),
])
def test_params_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"sampling.{field}"):
        SamplingParams(**({"max_tokens": 8} | kwargs))


def rows(n: int = 20, vocab: int = 512) -> tuple[torch.Tensor, list[int]]:
    """n random rows, each with its best token planted at a known place (so no test needs argmax)."""
    data = torch.randn(n, vocab, generator=torch.Generator().manual_seed(0)) * 4
    best = [(37 * i + 11) % vocab for i in range(n)]
    for i, b in enumerate(best):
        data[i, b] = data[i].max() + 0.5
    return data, best


def test_greedy_takes_the_largest_logit_and_the_first_of_a_tie():
    sampler = Sampler(SamplingParams(max_tokens=1))
    assert sampler.gen is None
    data, best = rows()
    assert [sampler(r) for r in data] == best
    assert sampler(torch.tensor([0.0, 3.0, 1.0, 3.0])) == 1
    assert sampler(torch.tensor([-math.inf, -5.0, -math.inf])) == 1
    assert sampler(torch.tensor([-1.0, -2.0, 7.5])) == 2


@pytest.mark.parametrize("temperature", [0.8, 5.0])
def test_top_k_1_and_a_tiny_top_p_are_greedy(temperature):
    by_k = Sampler(SamplingParams(max_tokens=1, temperature=temperature, top_k=1, seed=3))
    by_p = Sampler(SamplingParams(max_tokens=1, temperature=temperature, top_p=1e-6, seed=3))
    data, best = rows()
    assert [by_k(r) for r in data] == [by_p(r) for r in data] == best


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1.4e-45])
def test_tiny_temperature_is_greedy(temperature):
    """The limit temperature -> 0 is greedy; it must not overflow into NaN probabilities."""
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=temperature, seed=1))
    data, best = rows()
    assert [sampler(r) for r in data] == best


# Probabilities 0.5, 0.3, 0.15, 0.05 over a 6-token vocabulary (two tokens impossible).
PROBS = [0.5, 0.3, 0.15, 0.05, 0.0, 0.0]
DRAWS = 6000


def frequencies(**params) -> list[float]:
    sampler = Sampler(SamplingParams(max_tokens=1, seed=2024, **params))
    logits = torch.tensor([math.log(p) if p else -math.inf for p in PROBS])
    counts = [0] * len(PROBS)
    for _ in range(DRAWS):
        counts[sampler(logits)] += 1
    return [c / DRAWS for c in counts]


@pytest.mark.parametrize("params, want", [
    (dict(temperature=1.0), PROBS),
    # p ** (1 / T), renormalised: T = 0.5 squares them
    (dict(temperature=0.5), [x * x / sum(y * y for y in PROBS) for x in PROBS]),
    (dict(temperature=1.0, top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0, 0, 0]),
    # the smallest prefix whose mass reaches top_p: 0.5 alone reaches 0.5; 0.8 reaches 0.7
    (dict(temperature=1.0, top_p=0.5), [1, 0, 0, 0, 0, 0]),
    (dict(temperature=1.0, top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0, 0, 0]),
    (dict(temperature=1.0, top_p=0.9, top_k=3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0, 0, 0]),
])
def test_sampled_frequencies_follow_temperature_top_k_and_top_p(params, want):
    got = frequencies(**params)
    for token, (g, w) in enumerate(zip(got, want)):
        assert (g == 0) == (w == 0) and abs(g - w) < 0.03, (token, got, want)   # 4 sigma at n = 6000


def test_seed_reproduces_and_top_k_bounds_the_choice():
    params = SamplingParams(max_tokens=1, seed=99, **SEEDED)
    a, b = Sampler(params), Sampler(params)
    data, best = rows(200)
    drawn = [a(r) for r in data]
    assert drawn == [b(r) for r in data]
    assert drawn != best                                          # it does sample
    for r, t in zip(data, drawn):
        assert int((r > r[t]).sum()) < 20                         # among the 20 largest


# -- over gRPC ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    with running_server(tiny_models["qwen3_moe"], workers=2) as server:
        yield server


def sample(server, **kw) -> list[int]:
    tokens, _, last = generate(server.channel, PROMPT, max_tokens=N, ignore_eos=True, **kw)
    assert len(tokens) == N and last.finish_reason == pb.FINISH_REASON_LENGTH
    return tokens


@pytest.fixture(scope="module")
def greedy(server) -> list[int]:
    return sample(server)


def test_greedy_repeats(server, greedy):
    assert sample(server) == greedy


def test_same_seed_same_tokens_also_beside_another_request(server, greedy):
    first = sample(server, seed=123, **SEEDED)
    assert first != greedy
    assert sample(server, seed=123, **SEEDED) == first
    # again while another request is in the same batches
    other = pb.GenerateRequest(prompt_token_ids=[9, 8, 7, 6], sampling=pb.SamplingParams(
        max_tokens=400, temperature=1.0, ignore_eos=True))
    stream = pb_grpc.InferenceStub(server.channel).Generate(other, timeout=60)
    next(stream)
    try:
        assert sample(server, seed=123, **SEEDED) == first
        assert server.engine.scheduler.num_running >= 1       # it really ran beside the other
    finally:
        stream.cancel()


def test_different_seeds_differ(server):
    a, b = sample(server, seed=123, **SEEDED), sample(server, seed=124, **SEEDED)
    assert a != b


def test_top_k_1_is_greedy(server, greedy):
    assert sample(server, temperature=0.8, top_k=1, seed=5) == greedy
    assert sample(server, temperature=0.8, top_k=1) == greedy   # no seed needed


def test_tiny_temperature_is_greedy_and_disturbs_nobody(server, greedy):
    steady = pb.GenerateRequest(request_id="steady", prompt_token_ids=PROMPT,
                                sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True))
    stream = pb_grpc.InferenceStub(server.channel).Generate(steady, timeout=60)
    tokens = list(next(stream).token_ids)
    assert sample(server, temperature=1e-40) == greedy
    try:
        for msg in stream:
            tokens += msg.token_ids
    except grpc.RpcError as exc:
        pytest.fail(f"the stream beside it failed: {exc.code()} {exc.details()}")
    assert tokens[:N] == greedy and len(tokens) == 200
