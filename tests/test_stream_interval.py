"""`GenerateRequest.stream_interval`: the first token at once, then a message every N new tokens and
the last; the same tokens and text as a stream of one token per message. A request that leaves it
at 0 (and an HTTP stream) gets the server's `--stream-interval`; a non-streamed HTTP completion is
delivered whole, after its first token."""
from __future__ import annotations

import openai
import pytest

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.engine.request import Output, Request
from server.engine.sampling import SamplingParams
from tests.conftest import running_server

PROMPT = "Once upon a time"
TOKENS = 24
DEFAULT = 3     # the server's --stream-interval


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    with running_server(tiny_models["qwen3_moe"], workers=1, http_port=0, stream_interval=DEFAULT) as s:
        yield s


def _messages(server, interval: int, **sampling) -> list[pb.GenerateResponse]:
    req = pb.GenerateRequest(prompt=PROMPT, stream_interval=interval,
                             sampling=pb.SamplingParams(max_tokens=TOKENS, ignore_eos=True, **sampling))
    return list(pb_grpc.InferenceStub(server.channel).Generate(req, timeout=120))


def _joined(msgs: list[pb.GenerateResponse]) -> tuple[list[int], str]:
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)


@pytest.mark.parametrize("interval, sizes", [
    (0, [1] + [DEFAULT] * 7 + [2]),     # unset: the server's --stream-interval
    (1, [1] * TOKENS),
    (5, [1, 5, 5, 5, 5, 3]),            # the first at once, then every 5, the rest with the finish
    (TOKENS, [1, TOKENS - 1]),          # the whole completion: two messages
    (1000, [1, TOKENS - 1]),
])
def test_messages_carry_every_nth_token_and_the_same_completion(server, interval, sizes):
    each = _messages(server, 1)
    msgs = _messages(server, interval)
    assert [len(m.token_ids) for m in msgs] == sizes
    assert _joined(msgs) == _joined(each)
    assert [m.finish_reason for m in msgs][-1] == pb.FINISH_REASON_LENGTH
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert (msgs[-1].prompt_tokens, msgs[-1].completion_tokens) == (each[-1].prompt_tokens, TOKENS)


def test_a_stop_string_cuts_the_held_text_as_it_cuts_a_stream(server):
    full = _joined(_messages(server, 1))[1]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    each, held = _messages(server, 1, stop=[stop]), _messages(server, 7, stop=[stop])
    assert _joined(held) == _joined(each) and _joined(held)[1] == full[:full.index(stop)]
    assert held[-1].finish_reason == pb.FINISH_REASON_STOP and len(held) < len(each)


def test_a_completion_read_whole_over_http_is_the_streamed_one(server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="none", max_retries=0,
                           timeout=120)
    done = client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == _joined(_messages(server, 1))[1]
    assert done.usage.completion_tokens == TOKENS
    chunks = list(client.completions.create(model=server.config.model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    # a chunk per --stream-interval tokens (one whose text the detokenizer still holds is skipped)
    assert 1 < len(chunks) <= 1 + -(-(TOKENS - 1) // DEFAULT)


def _delivered(interval: int, tokens: int) -> list[Output]:
    req = Request("r", [1, 2], SamplingParams(max_tokens=tokens), stream_interval=interval)
    out = []
    for t in range(tokens - 1):
        req.completion += 1            # as the engine counts before it delivers
        due = req.deliver(100 + t, f"<{t}>")
        if due is not None:
            out.append(due)
    out.append(req.take_held())        # what the last output carries ahead of the last token
    return out


def test_deliver_holds_tokens_and_their_text_until_the_interval():
    outs = _delivered(4, 11)           # 10 delivered, the 11th would be the last
    assert [o.token_ids for o in outs] == [[100], [101, 102, 103, 104], [105, 106, 107, 108], [109]]
    assert [o.text for o in outs] == ["<0>", "<1><2><3><4>", "<5><6><7><8>", "<9>"]
    assert [len(o.token_ids) for o in _delivered(1, 5)] == [1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="stream_interval"):
        Request("r", [1], SamplingParams(max_tokens=1), stream_interval=0)
