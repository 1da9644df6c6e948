"""Incremental detokenization with stop strings that are never emitted, even across tokens.

Each update decodes only the last few tokens: the text of ids[prefix:] minus the text of
ids[prefix:read] is what the new tokens add. Decoding from a few tokens back, not from the new
token alone, keeps what depends on context (a word's leading space, a character split over
tokens) right; re-decoding the whole output every token would cost O(n^2) over a long answer.
"""

from __future__ import annotations

from strata.engine.tokenizer import Tokenizer


class OutputText:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], skip_special_tokens: bool) -> None:
        self._tok = tokenizer
        self._stop = [s for s in stop if s]
        self._skip_special = skip_special_tokens
        self.text = ""
        self._emitted = 0
        self.stopped = False
        self._committed = ""  # the text of ids[:read], final
        self._prefix = 0  # ids[prefix:read] is decoded again as the context of new tokens
        self._read = 0

    def update(self, output_ids: list[int]) -> None:
        """Decode the new output tokens; cut the text at the first stop string, if one appeared."""
        if self.stopped:
            return
        before = len(self.text)
        decode = self._tok.decode
        context = decode(output_ids[self._prefix : self._read], skip_special_tokens=self._skip_special)
        window = decode(output_ids[self._prefix :], skip_special_tokens=self._skip_special)
        if window.startswith(context):
            tail = window[len(context) :]
            text = self._committed + tail
            if tail and not tail.endswith("\ufffd"):  # whole characters: commit them
                self._committed = text
                self._prefix, self._read = self._read, len(output_ids)
        else:  # a tokenizer whose text of a window is not an extension of its context: decode it all
            text = decode(output_ids, skip_special_tokens=self._skip_special)
            if not text.endswith("\ufffd"):
                self._committed = text
                self._prefix, self._read = max(0, len(output_ids) - 4), len(output_ids)
        cut = -1
        for s in self._stop:
            i = text.find(s, max(0, min(before, len(text)) - len(s) + 1))
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            text = text[:cut]
            self.stopped = True
        self.text = text

    def take_delta(self, final: bool) -> str:
        """Text not yet emitted, holding back what may still become a stop string or a whole character."""
        limit = len(self.text)
        if not (final or self.stopped):
            limit -= self._holdback()
        delta = self.text[self._emitted : max(limit, self._emitted)]
        self._emitted = max(limit, self._emitted)
        return delta

    def _holdback(self) -> int:
        text = self.text
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return len(text) - len(text.rstrip("\ufffd"))
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
