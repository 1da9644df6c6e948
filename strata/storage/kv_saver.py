"""The saver: new KV out of device blocks into the DRAM tier, on its own thread, in the engine's order.

Everything that changes a session's stored tokens runs here, one job after the other (saves, finishes,
cut-backs of edited histories, truncations, and reads that must see them: ``call``), so a session's
operations apply in the order the engine issued them.

The queue is bounded in bytes of KV copies waiting (``limit_bytes``). When a save does not fit it is
dropped before anything is copied (counted as ``saves_dropped_queue_full``): the session's stored KV then
ends before that range, later saves of it would leave a hole and are dropped too, and the next turn
recomputes from there. A save is always admitted when nothing is waiting, so one save larger than the
whole bound still gets through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.cuda_streams import CudaStreams, HostCopy
from strata.storage.dram_tier import DramTier
from strata.storage.job_thread import JobThread
from strata.storage.kv_codec import KVCodec
from strata.storage.load_handle import KVLoadError
from strata.storage.session_entry import common_prefix
from strata.storage.session_index import SessionIndex
from strata.storage.ssd_tier import SsdTier

T = TypeVar("T")


class KVSaver:
    def __init__(self, index: SessionIndex, dram: DramTier, ssd: SsdTier, pool: BlockPool,
                 streams: CudaStreams | None, limit_bytes: int, codec: KVCodec) -> None:
        self.index = index
        self.codec = codec
        # What the queue holds: copies in the pool's dtype (encoded only on this thread).
        self._copy_token_bytes = pool.num_layers * pool.block_bytes // pool.block_size
        self.dram = dram
        self.ssd = ssd
        self.pool = pool
        self._streams = streams
        self.limit_bytes = limit_bytes
        self.queued_bytes = 0  # KV copies waiting to be applied; guarded by index.lock
        self.thread = JobThread("kv-saver", lambda: index.count("background_errors"))

    @property
    def busy(self) -> bool:
        """Saves are queued (unapplied)."""
        with self.index.lock:
            return self.queued_bytes > 0

    # ------------------------------------------------------------------ engine side

    def save(self, session_key: str, token_ids: list[int], blocks: BlockTable, start: int, end: int) -> None:
        index = self.index
        nbytes = (end - start) * self._copy_token_bytes
        with index.lock:  # admission before the copy: a full queue costs the forward nothing
            if self.queued_bytes > 0 and self.queued_bytes + nbytes > self.limit_bytes:
                index.counters["saves_dropped_queue_full"] += 1
                return
            self.queued_bytes += nbytes
            index.entry_locked(session_key).pending_saves += 1
            epoch = index.deletion_epoch
        kv = self.pool.read(blocks.slots(self.pool.block_size, start, end))  # a copy: the blocks may be freed now
        pending: torch.Tensor | HostCopy = kv if self._streams is None else self._streams.to_host(kv)
        ids = list(token_ids[:end])
        self.thread.put(lambda: self._apply_save(session_key, ids, start, pending, nbytes, epoch))

    def finish(self, session_key: str, token_ids: list[int]) -> None:
        ids = list(token_ids)
        self.thread.put(lambda: self._apply_finish(session_key, ids))

    def cut(self, session_key: str, prompt_ids: list[int]) -> None:
        """Edited history: cut the entry back to the divergence, after the saves already queued."""
        ids = list(prompt_ids)
        self.thread.put(lambda: self._apply_cut(session_key, ids))

    def call(self, fn: Callable[[], T], timeout: float | None) -> T:
        """Run ``fn`` on the saver thread behind the queued operations and return its result.

        Raises KVLoadError after ``timeout`` seconds; ``fn`` is then skipped if it has not started yet
        (if it has, it completes in the background, which is harmless: lookups compare token ids).
        """
        done = threading.Event()
        abandoned = threading.Event()
        result: list[T] = []
        error: list[BaseException] = []

        def op() -> None:
            try:
                if not abandoned.is_set():
                    result.append(fn())
            except BaseException as e:  # handed back to the caller's thread
                error.append(e)
            finally:
                done.set()

        self.thread.put(op)
        if not done.wait(timeout):
            abandoned.set()
            raise KVLoadError(f"the KV saver did not get to this within {timeout} s")
        if error:
            raise error[0]
        return result[0]

    # ------------------------------------------------------------------ saver thread

    def _apply_save(self, key: str, ids: list[int], start: int, pending: torch.Tensor | HostCopy,
                    nbytes: int, epoch: int) -> None:
        index = self.index
        try:
            kv = pending.wait() if isinstance(pending, HostCopy) else pending.to("cpu")
            kv = self.codec.encode(kv)  # what the tiers store (--kv-tier-dtype), off the engine thread
            with index.lock:
                if index.deleted_in_epoch.get(key, -1) > epoch:  # deleted after this save was queued
                    index.counters["saves_dropped_deleted"] += 1
                    return
                entry = index.entry_locked(key)
                entry.pending_saves = max(0, entry.pending_saves - 1)
                lcp = common_prefix(entry.tokens, ids)
                if lcp < len(entry.tokens):
                    index.cut_locked(entry, lcp)
                if lcp < start:  # the KV of [lcp, start) is nowhere: storing more would leave a hole
                    index.counters["saves_dropped"] += 1
                    return
                entry.last_used = time.time()
            if lcp < len(ids):
                self.dram.append(entry, ids, lcp, kv[:, :, lcp - start:])
                with index.lock:
                    self.dram.trim_windows_locked(entry)
        finally:
            with index.lock:
                self.queued_bytes -= nbytes
                if self.queued_bytes == 0:  # no save queued before any deletion is left
                    index.deleted_in_epoch.clear()

    def _apply_finish(self, key: str, ids: list[int]) -> None:
        index = self.index
        with index.lock:
            entry = index.entries.get(key)
            if entry is None:
                return
            lcp = common_prefix(entry.tokens, ids)
            if lcp < len(entry.tokens):
                index.cut_locked(entry, lcp)
            entry.last_used = time.time()
            self.ssd.queue_writeback_locked(key)

    def _apply_cut(self, key: str, prompt: list[int]) -> None:
        index = self.index
        with index.lock:
            entry = index.entries.get(key)
            if entry is None:
                return
            lcp = common_prefix(entry.tokens, prompt)
            if lcp < len(entry.tokens) and lcp < len(prompt):
                index.cut_locked(entry, lcp)
                self.ssd.queue_writeback_locked(key)
