"""Incremental detokenisation that never splits a UTF-8 character, and stop strings.

Byte-level tokenizers may end a token in the middle of a multi-byte character; the text of such a
prefix ends in U+FFFD. We hold those bytes back until the character is complete. Only a window of
recent tokens is decoded each step (the prefix before `prefix_offset` is settled text).
"""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0   # tokens before this are settled and never decoded again
        self.read_offset = 0     # tokens before this have been turned into emitted text
        self.stop = tuple(stop)
        self.text = ""           # all text emitted so far
        self._held = ""          # text that may still become (part of) a stop string
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the text that is now safe to send (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if full.endswith(_REPLACEMENT) or len(full) < len(prefix):
            return ""  # an incomplete character: wait for its next bytes
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(new)

    def _release(self, new: str) -> str:
        if not self.stop:
            self.text += new
            return new
        pending = self._held + new
        # the stop string that begins first cuts, whatever its place in the list
        hits = [at for at in (pending.find(s) for s in self.stop) if at >= 0]
        if hits:
            self.stopped = True
            out, self._held = pending[:min(hits)], ""
            self.text += out
            return out
        # keep back the longest tail that could still grow into a stop string
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(pending)), 0, -1):
                if s.startswith(pending[-k:]):
                    keep = max(keep, k)
                    break
        out, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of the stream: all text still held back, so that the stream's text equals the
        decode of its tokens. That is the bytes of a character that never completed (as decode gives
        them, U+FFFD) and a tail kept for a possible stop string that never came."""
        out = ""
        if self.read_offset < len(self.ids) and not self.stopped:
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
            full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
            self.prefix_offset = self.read_offset = len(self.ids)
            out = self._release(full[len(prefix):])   # may still complete a stop string
        held, self._held = self._held, ""
        self.text += held
        return out + held
