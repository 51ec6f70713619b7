"""Incremental detokenisation with the byte-level BPE tokenizer of a demo checkpoint: streamed text
equals the full decode and never shows half a character; stop strings cut the text where they
begin, also when they span tokens; and end to end over gRPC a stop string ends the stream."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from server.api import elasticmoe_pb2 as pb
from server.engine.detokenize import IncrementalDetokenizer
from tests.conftest import generate, running_server

MULTIBYTE = "café 東京 🙂 naïve, 日本 😀 жук and über"
PANGRAM = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tok(tiny_models) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_models["mixtral"] / "tokenizer.json"))


def stream(tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, stop)
    pieces = []
    for i in ids:
        pieces.append(detok.add(i))
        if detok.stopped:
            break
    return pieces, detok


def test_multibyte_text_streams_without_replacement_characters(tok):
    ids = tok.encode(MULTIBYTE).ids
    # the test means something only if some token ends inside a character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, detok = stream(tok, ids)
    assert not any("\ufffd" in p for p in pieces), pieces
    assert "".join(pieces) + detok.flush() == tok.decode(ids) == MULTIBYTE
    assert detok.text == MULTIBYTE


def test_every_cut_point_equals_the_full_decode(tok):
    """Incremental equals full-prefix decoding, also when the stream ends inside a character
    (then the end of the stream releases what decode itself gives: a replacement character)."""
    ids = tok.encode(MULTIBYTE).ids
    for cut in range(1, len(ids) + 1):
        pieces, detok = stream(tok, ids[:cut])
        assert "".join(pieces) + detok.flush() == tok.decode(ids[:cut]), cut


def test_stop_string_truncates_before_it(tok):
    ids = tok.encode(PANGRAM).ids
    pieces, detok = stream(tok, ids, stop=("jumps",))
    assert detok.stopped
    assert "".join(pieces) == "The quick brown fox "
    assert len(pieces) < len(ids)               # the stream ended at the stop string


def test_stop_string_spanning_tokens(tok):
    ids = tok.encode(PANGRAM).ids
    stop = "n fox"
    assert not any(stop in tok.decode([i]) for i in ids)   # no single token holds it
    pieces, detok = stream(tok, ids, stop=(stop,))
    assert detok.stopped and "".join(pieces) == "The quick brow"
    assert detok.text == "The quick brow"


def test_earliest_stop_string_wins(tok):
    # " over" arrives as one token holding both stop strings; the one that begins first cuts
    ids = tok.encode(PANGRAM).ids
    assert " over" in [tok.decode([i]) for i in ids]
    pieces, detok = stream(tok, ids, stop=("ver", "ov"))
    assert detok.stopped and "".join(pieces) == "The quick brown fox jumps "


def test_held_back_tail_is_released_by_flush(tok):
    ids = tok.encode(PANGRAM).ids
    pieces, detok = stream(tok, ids[:-1], stop=("dog!",))   # "... the lazy dog", no "!" follows
    streamed = "".join(pieces)
    assert not detok.stopped
    assert streamed == "The quick brown fox jumps over the lazy "   # "dog" might become "dog!"
    assert detok.flush() == "dog"
    assert detok.flush() == ""                 # released once
    assert detok.text == tok.decode(ids[:-1])


def test_no_stop_strings_hold_nothing_back(tok):
    ids = tok.encode(PANGRAM).ids
    pieces, detok = stream(tok, ids)
    assert "".join(pieces) == PANGRAM and detok.flush() == ""


# -- end to end ---------------------------------------------------------------------------------

def test_grpc_stop_string_ends_the_stream(tiny_models, ray_local):
    prompt = [5, 17, 33]
    with running_server(tiny_models["mixtral"], workers=1) as server:
        tokens, text, last = generate(server.channel, prompt, max_tokens=40, ignore_eos=True)
        assert last.finish_reason == pb.FINISH_REASON_LENGTH and len(tokens) == 40
        # a 3-character stop string first seen some way into the greedy text
        at = next(p for p in range(6, len(text) - 3)
                  if "\ufffd" not in text[p:p + 3] and text.find(text[p:p + 3]) == p)
        stop = text[at:at + 3]
        got, got_text, last = generate(server.channel, prompt, max_tokens=40, ignore_eos=True, stop=[stop])
        assert last.finish_reason == pb.FINISH_REASON_STOP
        assert got_text == text[:at]
        assert got == tokens[:len(got)] and len(got) < len(tokens)
        assert last.completion_tokens == len(got) and last.prompt_tokens == len(prompt)
