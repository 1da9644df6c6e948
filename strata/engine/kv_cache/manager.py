"""The KV cache manager, scheduler side: which device blocks a sequence holds and where its history comes from.

One object the scheduler talks to (CachedAttention, engine side):

* `acquire` on admission: the sequence takes over its session's cached device blocks (an HBM hit)
  or, failing that, the longest stored prefix in DRAM/SSD is loaded layer by layer into fresh
  blocks (the runner waits per layer, see ModelRunner). A preempted sequence gets back everything
  it computed, not only its prompt.
* `grow` gives a sequence blocks for its next step, dropping cached sessions to make room.
* `saved` hands the KV of newly computed tokens to the tier store after every step.
* `release` when a sequence finishes or is preempted: its blocks stay cached under its key. Blocks
  a tier load may still write into are freed only once the loader has let go of them (a delayed
  free, as vLLM's KV connector does in request_finished); `free_released` reclaims them each step.

Keys: a session's key (already scoped by tenant), or for requests without one a key from their
tenant and their first block of tokens, so one API key never learns what another sent.

KV computed with sublayers skipped (AdaSkip, from `seq.skip_from` on) is never handed on: it
lacks the skipped attention layers and differs from the full model's. It is neither saved nor
cached, so a later turn reads only KV of the full model.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

from strata.engine.kv_cache.device_cache import DeviceCache
from strata.engine.sequence import Sequence
from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVStore
from strata.storage.load_handle import KVLoadError, LoadHandle

log = logging.getLogger(__name__)


class KVCacheManager:
    def __init__(self, pool: BlockPool, store: KVStore | None, enabled: bool = True, step_tokens: int = 1024) -> None:
        self.pool = pool
        self.step_tokens = step_tokens  # the most tokens one step computes for a sequence
        self.cache = DeviceCache(pool)
        self.store = store
        self.enabled = enabled  # off: every request recomputes its whole prompt (the recompute baseline)
        self.hits: Counter[str] = Counter()  # by tier, "none" for misses
        self.tokens_reused: Counter[str] = Counter()
        self.load_failures = 0
        self.truncations = 0  # sessions whose stored KV was cut for a context overflow (by the store's preparer)
        self.skip_tokens_not_saved = 0  # tokens whose KV was computed with skipping, so dropped
        self._deferred: list[tuple[LoadHandle, BlockTable]] = []  # blocks a cancelled load may still write

    # ------------------------------------------------------------------ keys

    def cache_key(self, seq: Sequence) -> str | None:
        """The session key, or for requests without one a key from their tenant and first block of tokens."""
        if not self.enabled:
            return None
        if seq.request.session_key:
            return seq.request.session_key
        bs = self.pool.block_size
        if seq.num_prompt_tokens <= bs:
            return None
        digest = hashlib.sha256(f"{seq.request.tenant}|{seq.token_ids[:bs]}".encode()).hexdigest()[:24]
        return f"prefix:{digest}"

    def _protected(self, waiting: list[Sequence]) -> set[str]:
        return {k for s in waiting if (k := self.cache_key(s))}

    # ------------------------------------------------------------------ blocks

    def grow(self, seq: Sequence, num_tokens: int, waiting: list[Sequence]) -> bool:
        """Blocks for num_tokens tokens at each layer the sequence's next step writes KV at.

        Cached sessions are dropped to make room, those of waiting sequences last."""
        skip = seq.attn_skips_next()
        seq.blocks.drop_outside_windows(self.pool, seq.num_computed)  # what no later token reads
        need = seq.blocks.blocks_needed(self.pool, num_tokens, skip)
        if need <= 0:
            return True
        if need > self.pool.num_free and not self.cache.evict(need, self._protected(waiting)):
            return False
        seq.blocks.grow(self.pool, num_tokens, skip)
        return True

    def could_fit(self, seq: Sequence) -> bool:
        """Whether the pool could hold the whole sequence if every cached session went (an upper bound
        on its need: admission waits for running sequences instead of loading history it cannot use)."""
        need = self.pool.blocks_for_sequence(seq.num_tokens, self.step_tokens)
        return need <= self.pool.num_free + self.cache.num_blocks + seq.blocks.num_blocks

    @property
    def num_deferred_blocks(self) -> int:
        return sum(blocks.num_blocks for _, blocks in self._deferred)

    def free_released(self) -> None:
        """Free the blocks of cancelled loads whose loader has let go of them."""
        if not self._deferred:
            return
        still = []
        for handle, blocks in self._deferred:
            if handle.released:
                blocks.release(self.pool)
            else:
                still.append((handle, blocks))
        self._deferred = still

    def _drop_load(self, seq: Sequence) -> None:
        """Cancel the sequence's load in flight; its blocks go to the deferred list, the sequence gets none."""
        assert seq.load is not None
        seq.load.cancel()
        self._deferred.append((seq.load, seq.blocks))
        seq.load = None
        seq.blocks = BlockTable(self.pool.num_layers)

    # ------------------------------------------------------------------ admission

    def acquire(self, seq: Sequence) -> None:
        """Give a newly admitted sequence its reusable history: sets its blocks and num_computed."""
        key = self.cache_key(seq)
        first = seq.num_preemptions == 0  # what the client is told was reused: the first admission's
        if first:
            seq.cache_tier, seq.num_cached_tokens, seq.num_shared_tokens = None, 0, 0
        if key is None:
            return
        anonymous = not seq.request.session_key
        # Everything computed so far counts (after a preemption, generated tokens too).
        ids = seq.token_ids
        n, cached = self.cache.take(key, ids, whole_blocks_only=anonymous)
        tier = None
        if n:
            seq.blocks, seq.num_computed, tier = cached, n, "hbm"
        elif self.store is not None and not anonymous:
            tier = self._load_from_store(key, seq)
        if first:
            seq.num_cached_tokens = seq.num_computed
            seq.cache_tier = tier
            if tier not in (None, "hbm"):  # device blocks are the session's own; stored chunks may be shared
                seq.num_shared_tokens = min(seq.stored_shared_tokens, seq.num_computed)

    def admitted(self, seq: Sequence) -> None:
        """The sequence joined the running batch: count its hit (once, not again after a preemption)."""
        if seq.num_preemptions == 0:
            self.hits[seq.cache_tier or "none"] += 1
            self.tokens_reused[seq.cache_tier or "none"] += seq.num_cached_tokens

    def _load_from_store(self, key: str, seq: Sequence) -> str | None:
        assert self.store is not None
        hit = self.store.lookup(key, seq.token_ids)
        n = min(hit.tokens, seq.num_tokens - 1)
        need = self.pool.blocks_for_history(n)
        if n <= 0 or (self.pool.num_free < need and not self.cache.evict(need, {key})):
            return None
        blocks = BlockTable.allocate(self.pool, n)  # windowed layers load only their window
        try:
            # The store checks the stored ids against ours under its lock: a concurrent edit of the
            # session between lookup and load is refused, never served.
            seq.load = self.store.start_load(key, seq.token_ids, n, blocks)
        except KVLoadError as e:
            log.warning("load of %s failed, recomputing: %s", key, e)
            blocks.release(self.pool)
            self.load_failures += 1
            return None
        seq.blocks, seq.num_computed = blocks, n
        # Reported as where the history was when the request arrived: SSD (or the shared tier) even when
        # the store has read it into DRAM before the request was scheduled.
        return seq.stored_tier or hit.tier

    def give_back(self, seq: Sequence) -> None:
        """A waiting sequence that cannot be admitted now keeps nothing: what it acquired is cached
        again (or, while still loading, freed once the loader lets go), so others can run."""
        self.release(seq, keep=True, finished=False)
        seq.num_computed = 0
        seq.acquired = False

    def load_failed(self, seq: Sequence) -> None:
        """A layer never arrived (error or timeout): forget the loaded prefix and recompute it in fresh
        blocks, since the loader may still write into the old ones."""
        self.load_failures += 1
        if seq.load is not None:
            self._drop_load(seq)
        else:
            seq.blocks.release(self.pool)
            seq.blocks = BlockTable(self.pool.num_layers)
        seq.num_computed = 0
        seq.num_cached_tokens = 0
        seq.num_shared_tokens = 0
        seq.cache_tier = None

    # ------------------------------------------------------------------ after a step, at the end

    @staticmethod
    def reusable(seq: Sequence) -> int:
        """Tokens at the start of the sequence whose KV is in its blocks and is the full model's."""
        return seq.num_computed if seq.skip_from is None else min(seq.num_computed, seq.skip_from)

    def saved(self, seq: Sequence, start: int, end: int) -> None:
        """The K/V of tokens [start, end) are now in the sequence's blocks."""
        key = seq.request.session_key
        end = min(end, self.reusable(seq))
        if self.store is not None and key and end > start and seq.keeps_kv:
            self.store.save(key, seq.token_ids, seq.blocks, start, end)

    def release(self, seq: Sequence, keep: bool, finished: bool = True) -> None:
        """The sequence is done or preempted: keep its blocks cached under its key (or free them).

        `finished` False (a waiting sequence giving back what it took) leaves the stored entry alone."""
        if seq.load is not None:  # its history may be half loaded: nothing of it is kept
            self._drop_load(seq)
            keep = False
        keep = keep and seq.keeps_kv
        key = self.cache_key(seq)
        computed = seq.token_ids[: seq.num_computed]
        reusable = computed[: self.reusable(seq)]
        self.skip_tokens_not_saved += len(computed) - len(reusable)
        if key is not None and keep and reusable:
            self.cache.put(key, reusable, seq.blocks, whole_blocks_only=not seq.request.session_key)
        else:
            seq.blocks.release(self.pool)
        seq.blocks = BlockTable(self.pool.num_layers)
        # The store holds only reusable KV (see saved()); the computed ids just confirm its entry.
        if self.store is not None and seq.request.session_key and keep and finished and computed:
            self.store.finish(seq.request.session_key, computed)
        # Its blocks are gone: a recomputation (after a preemption) starts from full-model history.
        seq.skip_from = None
        if seq.skip is not None:
            seq.skip.restart()

    def upcoming(self, waiting: list[Sequence]) -> None:
        if self.store is not None:
            self.store.hint_upcoming([s.request.session_key for s in waiting if s.request.session_key])
