"""Turning a text prompt into token ids, with its size bounded before the tokenizer sees it.

Tokenizing costs CPU and memory in proportion to the text (a 3.9 MB prompt cost seconds and GBs
of RSS before the length check refused it), so text that cannot fit the context is refused by its
size first. The bound is exact for the tokenizers used here: no token stands for more bytes of
text than its own string has in UTF-8 (byte-level BPE and SentencePiece write each token's bytes
as at least as many UTF-8 bytes), and a byte-fallback or unknown token covers one character
(at most 4 bytes). So a prompt of more than `max_model_len x max(4, longest token)` bytes cannot
encode to `max_model_len` tokens or fewer.
"""
from __future__ import annotations

from typing import Protocol

from server.api.requests import TextTokenizer, encode_prompt

BYTES_PER_CHAR = 4   # the most a UTF-8 character takes


class VocabTokenizer(TextTokenizer, Protocol):
    def get_vocab(self) -> dict[str, int]: ...


class PromptEncoder:
    def __init__(self, tokenizer: VocabTokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        longest = max((len(t.encode("utf-8")) for t in tokenizer.get_vocab()), default=0)
        self.bytes_per_token = max(BYTES_PER_CHAR, longest)
        self.max_bytes = max_model_len * self.bytes_per_token

    def check_size(self, text: str) -> None:
        """ValueError naming `prompt` when the text is too large to fit the context; costs no
        tokenizing (its UTF-8 size is one pass at memory speed: about a millisecond for 4 MB)."""
        size = len(text.encode("utf-8"))
        if size > self.max_bytes:
            raise ValueError(f"prompt: {size} bytes is more than the "
                             f"{self.max_bytes} bytes any prompt that fits the context can have "
                             f"({self.max_bytes // self.bytes_per_token} tokens x {self.bytes_per_token} bytes)")

    def encode(self, text: str) -> list[int]:
        """Token ids of a non-empty prompt; ValueError naming `prompt` otherwise."""
        self.check_size(text)
        return encode_prompt(self.tokenizer, text)
