"""Where a request's history KV comes from, and where its new KV goes (CachedAttention, engine side).

On admission a sequence takes over its session's cached device blocks (HBM hit) or, failing
that, asks the tier store for the longest stored prefix (DRAM or SSD hit) and starts a
layer-wise load into fresh blocks; the runner then waits per layer. After every step the
KV of the newly computed tokens is handed to the store; when a request finishes its blocks
stay cached under its session key.

KV computed with sublayers skipped (AdaSkip, from `seq.skip_from` on) is never handed on: it
lacks the skipped attention layers and differs from the full model's. It is neither saved nor
cached, so the session's stored entry stays what it was, plus what was computed before the first
skip, and a later turn reads only KV of the full model.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

from strata.engine.sequence import Sequence
from strata.engine.stored_cut import stored_cut
from strata.storage.block_table import BlockTable
from strata.storage.device_cache import DeviceCache
from strata.storage.kv_store import KVStore
from strata.storage.load_handle import KVLoadError

log = logging.getLogger(__name__)


class KVReuse:
    def __init__(self, cache: DeviceCache, store: KVStore | None, enabled: bool = True) -> None:
        self.cache = cache
        self.store = store
        self.enabled = enabled  # off: every request recomputes its whole prompt (the recompute baseline)
        self.hits: Counter[str] = Counter()  # by tier, "none" for misses
        self.tokens_reused: Counter[str] = Counter()
        self.load_failures = 0
        self.truncations = 0  # sessions whose stored KV was cut for a context overflow
        self.skip_tokens_not_saved = 0  # tokens whose KV was computed with skipping, so dropped

    def cache_key(self, seq: Sequence) -> str | None:
        """The session key, or for requests without one a key from their first block of tokens."""
        if not self.enabled:
            return None
        if seq.request.session_key:
            return seq.request.session_key
        bs = self.cache.pool.block_size
        if seq.num_prompt_tokens <= bs:
            return None
        digest = hashlib.sha256(str(seq.token_ids[:bs]).encode()).hexdigest()[:24]
        return f"prefix:{digest}"

    def acquire(self, seq: Sequence) -> None:
        """Give a newly admitted sequence its reusable history: sets its blocks and num_computed."""
        key = self.cache_key(seq)
        seq.cache_tier = None
        if key is None:
            return
        anonymous = not seq.request.session_key
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        if not anonymous:
            self._truncate(key, seq)
        pool = self.cache.pool
        n, cached = self.cache.take(key, prompt, whole_blocks_only=anonymous)
        if n:
            seq.blocks, seq.num_computed, seq.cache_tier = cached, n, "hbm"
        elif self.store is not None and not anonymous:
            hit = self.store.lookup(key, prompt)
            n = min(hit.tokens, seq.num_prompt_tokens - 1)
            need = pool.blocks_for(n) * pool.num_layers
            if n > 0 and (pool.num_free >= need or self.cache.evict(need, {key})):
                blocks = BlockTable.allocate(pool, n)
                try:
                    seq.load = self.store.start_load(key, n, blocks)
                except KVLoadError as e:
                    log.warning("load of %s failed, recomputing: %s", key, e)
                    blocks.release(pool)
                    self.load_failures += 1
                else:
                    seq.blocks, seq.num_computed, seq.cache_tier = blocks, n, hit.tier
        seq.num_cached_tokens = seq.num_computed
        self.hits[seq.cache_tier or "none"] += 1
        self.tokens_reused[seq.cache_tier or "none"] += seq.num_computed

    def _truncate(self, key: str, seq: Sequence) -> None:
        """Context overflow: cut the session's stored KV as its prompt was cut (later keys re-rotated).

        The cached device blocks still hold the keys at their old positions, so they are dropped
        and the lookup that follows hits the re-rotated copy in DRAM/SSD. Any failure only
        costs reuse: the lookup compares token ids, so a stale or short entry is never misused.
        """
        if seq.request.truncation is None or seq.truncation_applied or self.store is None:
            return
        seq.truncation_applied = True  # once: a preempted sequence is acquired again
        self.cache.drop(key)
        # The request's range is in the client's full history; the stored ids may be cut already.
        cut = stored_cut(self.store.tokens(key), seq.token_ids[: seq.num_prompt_tokens])
        if cut is None:
            return
        try:
            self.store.truncate(key, *cut)
        except (KeyError, ValueError, KVLoadError) as e:
            log.info("session %s not truncated in the store, its prompt is recomputed: %s", key, e)
            return
        self.truncations += 1

    def load_failed(self, seq: Sequence) -> None:
        """A layer never arrived: forget the loaded prefix and recompute it in the same blocks."""
        self.load_failures += 1
        if seq.load is not None:
            seq.load.cancel()
        seq.load = None
        seq.num_computed = 0
        seq.num_cached_tokens = 0
        seq.cache_tier = None

    @staticmethod
    def reusable(seq: Sequence) -> int:
        """Tokens at the start of the sequence whose KV is in its blocks and is the full model's."""
        return seq.num_computed if seq.skip_from is None else min(seq.num_computed, seq.skip_from)

    def saved(self, seq: Sequence, start: int, end: int) -> None:
        """The K/V of tokens [start, end) are now in the sequence's blocks."""
        key = seq.request.session_key
        end = min(end, self.reusable(seq))
        if self.store is not None and key and end > start:
            self.store.save(key, seq.token_ids, seq.blocks, start, end)

    def release(self, seq: Sequence, keep: bool) -> None:
        """The sequence is done: keep its blocks cached under its key (or free them)."""
        if seq.load is not None:
            seq.load.cancel()
            seq.load = None
            keep = False  # its history may be half loaded
        key = self.cache_key(seq)
        computed = seq.token_ids[: seq.num_computed]
        reusable = computed[: self.reusable(seq)]
        self.skip_tokens_not_saved += len(computed) - len(reusable)
        if key is not None and keep and reusable:
            self.cache.put(key, reusable, seq.blocks, whole_blocks_only=not seq.request.session_key)
        else:
            seq.blocks.release(self.cache.pool)
        seq.blocks = BlockTable(self.cache.pool.num_layers)
        # The store holds only reusable KV (see saved()); the computed ids just confirm its entry.
        if self.store is not None and seq.request.session_key and keep and computed:
            self.store.finish(seq.request.session_key, computed)
        # Its blocks are gone: a recomputation (after a preemption) starts from full-model history.
        seq.skip_from = None
        if seq.skip is not None:
            seq.skip.restart()

    def upcoming(self, waiting: list[Sequence]) -> None:
        if self.store is not None:
            self.store.hint_upcoming([s.request.session_key for s in waiting if s.request.session_key])
