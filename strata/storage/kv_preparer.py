"""The store's side of a session request's admission: everything that may wait on storage happens here, on
a thread of its own, before the engine schedules the request (as vLLM v1 parks a request until its remote KV
has arrived). The engine thread never waits on a disk or the network for it.

For one request, in order:

1. the shared tier (``remote=``): import the session if this server lacks it (the content chunks its prompt
   starts with, then its own), or learn that it was deleted elsewhere (what this server holds of it is
   dropped; the engine drops its device copy);
2. a context overflow (``truncate``): find the cut in what the session has stored (after its pending saves)
   and apply it, re-rotating the kept keys (:mod:`.truncation`);
3. sharing: when stored content chunks (another session's, same tenant) cover more of the prompt than the
   session's own history, the session starts with them (after its pending saves);
   an edited history: queue the cut-back of the entry to where the prompt leaves it;
4. count the lookup (once per request, whatever the scheduler asks later);
5. the SSD: read the chunks the prompt reuses that only the SSD holds into DRAM, so the forward pass loads
   from memory (when DRAM cannot make room, that part is still loaded from the SSD layer by layer).

``done`` is called exactly once with what the engine must know, also when a step failed (the failure is
logged and counted; the request then reuses less, never wrong KV: loads compare token ids).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from strata.storage.job_thread import JobThread
from strata.storage.load_handle import KVLoadError
from strata.storage.stored_cut import stored_cut

if TYPE_CHECKING:
    from strata.storage.kv_store import KVStore

log = logging.getLogger(__name__)


class Prepared(NamedTuple):
    deleted_elsewhere: bool = False  # the session was deleted on another server: drop its device copy
    truncated: bool = False  # its stored KV was cut and re-rotated: a device copy holds the old positions
    tier: str | None = None  # where the store held the reusable prefix when asked (before any SSD read)
    shared_tokens: int = 0  # of that prefix, tokens in chunks other sessions share


class KVPreparer:
    def __init__(self, store: KVStore) -> None:
        self.store = store
        self.thread = JobThread("kv-prepare", lambda: store.index.count("background_errors"))

    def prepare(self, key: str, prompt_ids: list[int], truncate: bool, done: Callable[[Prepared], None],
                share: bool = True) -> None:
        ids = list(prompt_ids)
        self.thread.put(lambda: self._run(key, ids, truncate, done, share))

    def _run(self, key: str, prompt_ids: list[int], truncate: bool, done: Callable[[Prepared], None],
             share: bool) -> None:
        store = self.store
        result = Prepared()
        try:
            deleted = store.remote is not None and store.import_remote(key, prompt_ids).deleted_elsewhere
            truncated = truncate and self._truncate(key, prompt_ids)
            result = Prepared(deleted, truncated)
            if share and not truncated:
                store.adopt_shared(key, prompt_ids)
            hit, diverges = store.index.lookup(key, prompt_ids)
            if diverges:
                store.saver.cut(key, prompt_ids)
            store.index.count_lookup(hit)
            result = Prepared(deleted, truncated, hit.tier, store.index.shared_tokens(key, hit.tokens))
            if hit.tier in ("ssd", "remote"):
                store.ssd.prefetch(key, store.dram, in_window=False, num_tokens=hit.tokens)
        except Exception:
            log.exception("preparing the stored KV of %s failed; its request reuses less", key)
            store.index.count("background_errors")
        finally:
            done(result)

    def _truncate(self, key: str, prompt_ids: list[int]) -> bool:
        """Cut the session's stored KV as its prompt was cut (the client's full history minus the dropped
        messages); False when there was nothing to cut or it could not be done (then it is recomputed)."""
        store = self.store
        try:
            cut = stored_cut(store.tokens(key), prompt_ids)
            if cut is None:
                return False
            store.truncate(key, *cut)
        except (KeyError, ValueError, KVLoadError) as e:
            log.info("session %s not truncated in the store, its prompt is recomputed: %s", key, e)
            return False
        return True
