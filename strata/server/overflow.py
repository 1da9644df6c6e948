"""Context overflow: which chat messages to drop so the prompt fits, and which tokens that removes.

The system messages and the most recent messages are kept; whole messages are dropped from
the oldest non-system one on, as few as possible. The prompt must leave room for the
completion: ``max_tokens`` when the client gave it, else ``min(512, limit // 4)``.

Templates like ChatML render every message on its own, so dropping messages k..j removes one
contiguous token range (keep_head, drop_end) of the full prompt. That is not assumed but
checked on the token ids: when it does not hold (a template that renders messages
depending on each other, a system message kept between dropped ones), ``truncation`` is None
and the engine reuses only the common prefix, recomputing the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strata.engine.tokenizer import ChatTemplateError

Message = dict[str, Any]

MAX_RESERVE = 512


@dataclass
class Fitted:
    messages: list[Message]  # what is left of the conversation
    kept: list[int]  # the indices of those messages in the conversation
    prompt_ids: list[int]
    dropped_messages: int
    dropped_tokens: int
    truncation: tuple[int, int] | None  # (keep_head, drop_end) in the full prompt's ids


def completion_reserve(requested: int | None, limit: int) -> int:
    """Room the prompt must leave for the completion."""
    return requested if requested is not None else min(MAX_RESERVE, limit // 4)


def fit_messages(encode: Callable[[list[Message]], list[int]], messages: list[Message], full_ids: list[int],
                 budget: int) -> Fitted | None:
    """Drop the fewest oldest non-system messages so the prompt is at most ``budget`` tokens.

    ``encode`` renders and tokenizes messages, ``full_ids`` is the prompt of all of them.
    None when even the system messages and the last message do not fit.
    """
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))

    def kept_indices(j: int) -> list[int]:  # messages[first:j] dropped, system messages kept
        return [i for i, m in enumerate(messages) if i >= j or i < first or m["role"] == "system"]

    def kept(j: int) -> list[Message]:
        return [messages[i] for i in kept_indices(j)]

    def fits(j: int) -> list[int] | None:
        try:
            ids = encode(kept(j))
        except ChatTemplateError:  # e.g. a template that wants the user to speak first
            return None
        return ids if len(ids) <= budget else None

    # The prompt shrinks as more messages go: the smallest j that fits, by bisection.
    lo, hi = first + 1, len(messages) - 1
    if lo > hi or fits(hi) is None:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    ids = fits(lo)
    assert ids is not None
    return Fitted(kept(lo), kept_indices(lo), ids, len(messages) - len(kept(lo)), len(full_ids) - len(ids),
                  dropped_range(full_ids, ids))


def dropped_range(full: list[int], kept: list[int]) -> tuple[int, int] | None:
    """(keep_head, drop_end) with kept == full[:keep_head] + full[drop_end:], or None."""
    head = 0
    while head < min(len(full), len(kept)) and full[head] == kept[head]:
        head += 1
    drop_end = len(full) - (len(kept) - head)
    if drop_end < head or full[drop_end:] != kept[head:]:
        return None
    return head, drop_end
