"""Incremental detokenization with stop strings that are never emitted, even across tokens."""

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

    def update(self, output_ids: list[int]) -> None:
        """Re-decode the output; cut it at the first stop string, if one appeared."""
        if self.stopped:
            return
        before = len(self.text)
        text = self._tok.decode(output_ids, skip_special_tokens=self._skip_special)
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
