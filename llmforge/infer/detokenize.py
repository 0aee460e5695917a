"""Incremental detokenization that never emits half a character.

Decoding one token at a time is wrong twice over: a byte-fallback tokenizer (sentencepiece ``<0xE2>``) or a
byte-level BPE spreads one UTF-8 character over several tokens, each of which decodes alone to U+FFFD; and
decoders that strip or add spaces depend on the neighbouring tokens. So, as vLLM and TGI do, the text of the
new tokens is the difference between decoding a short window that ends with them and decoding the same window
without them, and it is released only once it does not end in U+FFFD (a character still arriving). The window
starts inside the prompt, so the first completion token keeps its leading space. Concatenating every ``add``
and the final ``flush`` equals ``decode(prompt + output)[len(decode(prompt)):]`` for prefix-stable decoders.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
# Context kept before the unreleased tokens; a few tokens are enough for space handling.
_WINDOW = 6
# A UTF-8 character is at most 4 bytes: a U+FFFD still there after that many tokens is really in the text.
_MAX_PENDING = 4


class IncrementalDetokenizer:
    """Turns a request's generated ids into text deltas; ``tokenizer`` needs only ``decode(ids, ...)``."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        tail = list(prompt_ids[-_WINDOW:])
        # Start the window on a character boundary: a window that opens mid-character decodes to U+FFFD, and
        # byte-fallback decoders then garble the whole byte run, the new character included.
        start = next(
            (k for k in range(len(tail)) if not self._decode(tail[k:]).startswith(REPLACEMENT)), len(tail)
        )
        self.ids: list[int] = tail
        self.prefix_offset = start  # start of the decoding window
        self.read_offset = len(self.ids)  # tokens before this are released
        self.text = ""  # everything released so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _delta(self, *, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        pending = len(self.ids) - self.read_offset
        if not final and (
            len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT) and pending < _MAX_PENDING)
        ):
            return ""
        delta = new_text[len(prefix_text) :]
        # The next window starts where this release ended: a character boundary, and short (decode cost per
        # token stays constant).
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now complete (often "", e.g. mid-character)."""
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """At the end of the request: whatever is still held (a genuinely invalid byte sequence included)."""
        if self.read_offset == len(self.ids):
            return ""
        return self._delta(final=True)
