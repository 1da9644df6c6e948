"""Which sessions give up their place first, for the two policies the store supports."""

from __future__ import annotations

from collections.abc import Iterable

from strata.storage.session_entry import SessionEntry

POLICIES = ("scheduler", "lru")


def eviction_order(entries: Iterable[SessionEntry], *, policy: str, window: dict[str, int],
                   pinned: set[str], exclude: set[str]) -> list[SessionEntry]:
    """Victims, first to go first.

    "lru": least recently used first, nothing else counts. "scheduler": sessions with no
    queued request first (LRU among them), then look-ahead window sessions, the one
    furthest back in the queue first, so a window session only goes when nothing else can.
    Pinned sessions come last in both (they are only moved, see the callers).
    Sessions being loaded and ``exclude`` are never candidates.
    """
    candidates = [e for e in entries if e.key not in exclude and e.active_loads == 0]
    if policy == "lru":
        free = sorted((e for e in candidates if e.key not in pinned), key=lambda e: e.last_used)
    else:
        outside = [e for e in candidates if e.key not in window and e.key not in pinned]
        inside = [e for e in candidates if e.key in window and e.key not in pinned]
        free = sorted(outside, key=lambda e: e.last_used) + sorted(inside, key=lambda e: -window[e.key])
    last = sorted((e for e in candidates if e.key in pinned), key=lambda e: e.last_used)
    return free + last
