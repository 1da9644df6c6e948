"""Where a context-overflow cut falls in what a session has stored.

The server cuts the client's full history, but the session's stored ids may already be cut by
an earlier overflow (the client keeps sending everything). So the cut is found again on the
stored ids: keep their common prefix with the new prompt, and drop up to the point where the
stored ids go on as the prompt does. Token ids decide, so a wrong guess only costs reuse.
"""

from __future__ import annotations

from strata.storage.session_entry import common_prefix

ANCHOR = 32  # prompt tokens that must reappear in the stored ids for a cut to be worth it


def stored_cut(stored: list[int], prompt: list[int]) -> tuple[int, int] | None:
    """(keep_head, drop_end): stored[:keep_head] + stored[drop_end:] continues ``prompt`` the longest.

    None when the stored ids are already a prefix of the prompt or never go on as it does.
    """
    head = common_prefix(stored, prompt)
    if head >= len(stored) or head >= len(prompt):
        return None
    rest = prompt[head:]
    anchor = rest[:ANCHOR]
    best, best_len = None, 0
    i = head + 1
    while True:
        try:
            i = stored.index(anchor[0], i)
        except ValueError:
            break
        if stored[i:i + len(anchor)] == anchor:
            n = common_prefix(stored[i:], rest)
            if n > best_len:
                best, best_len = i, n
        i += 1
    return None if best is None else (head, best)
