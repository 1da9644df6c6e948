"""CachedAttention: session-keyed KV reuse across the DRAM and SSD tiers.

The engine owns HBM (the :class:`BlockPool` and its cached blocks); this store keeps
every session's KV in host memory (DRAM) and in chunk files (SSD), and moves it in
and out of device blocks. ``lookup`` never reports the ``"hbm"`` tier: an HBM hit is
the engine's business (its blocks are still cached), it asks the store only on a miss.

Interface (all methods are called from the engine thread; they never block on I/O
except ``flush``, ``close``, ``truncate``, ``tokens`` and ``wait_layer``)::

    store = KVStore(pool, model_fingerprint=..., dram_bytes=..., ssd_dir=Path | None, ssd_bytes=...,
                    policy="scheduler" | "lru", ttl_s=3600.0, chunk_tokens=256,
                    rope_inv_freq=None, readahead_layers=None)
    store.lookup(key, prompt_ids) -> Hit(tokens, tier)   # tier "dram" | "ssd" | None
    store.hint_upcoming(keys)                            # waiting queue order, first = next
    store.start_load(key, num_tokens, blocks) -> LoadHandle   # blocks: a BlockTable
    store.wait_layer(handle, layer, timeout=None)        # raises KVLoadError: recompute instead
    store.save(key, token_ids, blocks, start, end)       # copies KV [start, end) out of the blocks now
    store.finish(key, token_ids)
    store.truncate(key, keep_head, drop_end) -> int      # context overflow, re-rotates kept keys
    store.tokens(key) -> list[int]                       # stored ids, after pending saves
    store.pin(key, seconds); store.delete(key) -> bool; store.info(key) -> dict | None
    store.sessions() -> list[str]; store.stats() -> dict[str, float]
    store.flush(); store.close()

Semantics the engine relies on:

* ``lookup`` returns the longest common prefix of ``prompt_ids`` and the tokens whose
  save has completed; it may equal ``len(prompt_ids)``, the engine must still compute
  at least the last prompt token. If the prompt diverges from the stored ids (edited
  history), the entry is cut back to the divergence point (after any pending saves).
* ``start_load`` must follow ``lookup`` for at most the returned token count;
  ``blocks`` covers tokens ``[0, num_tokens)`` at every layer. Layers arrive in order; with
  ``readahead_layers`` set the loader runs at most that many layers ahead of the last
  ``wait_layer`` (cancel an abandoned handle with ``handle.cancel()``).
* ``save`` takes ``token_ids`` (the session's tokens, at least ``end`` of them) and
  stores only what the entry lacks: tokens before the longest common prefix with the
  stored ids are skipped, and a save that would leave a gap is dropped (counted).
* Chunks are written back to SSD in the background once full, and the rest when the
  request ``finish``-es; DRAM eviction of a written chunk is then a drop.
* Sessions survive a restart through the SSD tier; pins and the look-ahead window do not.
  ``close`` writes back every chunk DRAM holds that the SSD lacks.
* Eviction DRAM -> SSD picks chunks (tail first) of the victim session given by
  :func:`eviction_order`; a chunk with no SSD copy is written first, or, if it cannot
  be, dropped and the session cut back there. SSD eviction (budget full) removes a whole
  session's files; TTL expiry removes a session idle for ``ttl_s`` from every tier.
  Pinned sessions never leave SSD nor expire; in DRAM they go last.
* Budgets count chunk tensors (DRAM, by capacity) and chunk files (SSD, reserved before
  writing). Not counted: KV copies waiting in the save queue and tensors still held by a
  load in flight after their chunk was dropped.

``stats()`` keys (flat, for Prometheus): ``lookups_hit_dram``, ``lookups_hit_ssd``,
``lookups_miss``, ``tokens_reused_{dram,ssd}`` (counted at ``start_load``),
``bytes_loaded_{dram,ssd}``, ``bytes_saved_{dram,ssd}``, ``load_seconds`` (loader busy),
``load_stall_seconds`` (runner blocked in ``wait_layer``; split by the slowest tier a load reads
from as ``load_stall_seconds_{dram,ssd}``), ``load_overlap_seconds``,
``evictions_{dram,ssd}`` (DRAM: chunks, SSD: sessions), ``expirations``,
``occupancy_bytes_{dram,ssd}``, ``capacity_bytes_{dram,ssd}``, ``sessions``,
``prefetches_issued``, ``prefetches_used`` (chunks), ``corrupt_chunks_discarded``,
``chunks_discarded_<reason>`` (checksum, fingerprint, truncated, format, stale, io),
``temp_files_removed``, ``saves_dropped``, ``load_errors``.

On a GPU (the pool's device is CUDA) the DRAM tier is pinned host memory, loads run on a CUDA stream
with one event per layer (``wait_layer`` makes the caller's stream wait on it, the host does not block
on the copy) and saves copy to the host on a second stream; see :mod:`strata.storage.cuda_streams`.
Elsewhere the same threads copy with plain tensor ops.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from strata.kernels.ops import copy_kv_slots
from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.chunk_file import (
    TEMP_MARK,
    ChunkError,
    ChunkHeader,
    ChunkLayout,
    commit,
    fsync_dir,
    prefix_hash,
    read_header,
    read_layer,
    write_temp,
)
from strata.storage.cuda_streams import CudaStreams, HostCopy
from strata.storage.eviction import POLICIES, eviction_order
from strata.storage.load_handle import KVLoadError, LoadHandle
from strata.storage.reencode import drop_and_reposition, drop_tokens
from strata.storage.session_entry import Chunk, SessionEntry, SsdCopy, common_prefix
from strata.storage.ssd_scan import chunk_path, file_stem, scan_directory

log = logging.getLogger(__name__)

__all__ = ["Hit", "KVLoadError", "KVStore", "LoadHandle"]


class Hit(NamedTuple):
    tokens: int
    tier: str | None  # "dram" | "ssd" | None (miss); "ssd" when any reused chunk must come from disk


@dataclass
class _Piece:
    """One chunk's part of a load: from a DRAM tensor or an open chunk file."""

    chunk: Chunk
    start: int
    count: int
    dram: torch.Tensor | None
    fd: int | None


_MIN_CAPACITY = 16


class KVStore:
    def __init__(self, pool: BlockPool, *, model_fingerprint: str, dram_bytes: int, ssd_dir: Path | None,
                 ssd_bytes: int, policy: str = "scheduler", ttl_s: float = 3600.0, chunk_tokens: int = 256,
                 rope_inv_freq: torch.Tensor | None = None, readahead_layers: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        _, _, _, heads, dim = pool.kv.shape
        layers = pool.num_layers
        self.pool = pool
        self.policy = policy
        self.ttl_s = ttl_s
        self.chunk_tokens = chunk_tokens
        self.dram_bytes = dram_bytes
        self.ssd_bytes = ssd_bytes if ssd_dir is not None else 0
        self.ssd_dir = Path(ssd_dir) if ssd_dir is not None else None
        self.rope_inv_freq = rope_inv_freq
        self.layout = ChunkLayout(model_fingerprint, layers, heads, dim, pool.kv.dtype)
        self.num_layers = layers
        self.token_bytes = self.layout.layer_bytes(1) * layers
        self._readahead = readahead_layers or layers
        self._streams = CudaStreams(pool.kv.device) if pool.kv.is_cuda else None
        self._pin = self._streams is not None  # pinned DRAM chunks: async DMA, readable by the copy kernel

        self._lock = threading.Lock()
        self._entries: dict[str, SessionEntry] = {}
        self._window: dict[str, int] = {}
        self._pins: dict[str, float] = {}
        self._dram_used = 0
        self._ssd_used = 0
        self._ssd_reserved = 0
        self._counters: Counter[str] = Counter()
        self._writeback_queued: set[str] = set()
        self._prefetch_queued: set[str] = set()
        self._next_expiry = 0.0

        if self.ssd_dir is not None:
            self.ssd_dir.mkdir(parents=True, exist_ok=True)
            scan = scan_directory(self.ssd_dir, self.layout)
            self._entries = scan.entries
            self._ssd_used = sum(e.ssd_bytes() for e in self._entries.values())
            self._counters["temp_files_removed"] += scan.temp_removed
            for reason, n in scan.discarded.items():
                self._counters[f"chunks_discarded_{reason}"] += n
                if reason != "stale":
                    self._counters["corrupt_chunks_discarded"] += n
            with self._lock:
                self._reserve_ssd_locked(0, None)  # a smaller budget than last time: evict down to it
                self._ssd_reserved = 0
                self._expire_locked(time.time())

        self._closed = False
        self._handles: weakref.WeakSet[LoadHandle] = weakref.WeakSet()  # close() cancels loads in flight
        self._saves: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._io: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._loads: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._worker, args=(self._saves, None), name="kv-saver", daemon=True),
            threading.Thread(target=self._worker, args=(self._io, self._periodic), name="kv-io", daemon=True),
            threading.Thread(target=self._worker, args=(self._loads, None), name="kv-loader", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ engine-facing API

    def lookup(self, session_key: str, prompt_ids: list[int]) -> Hit:
        now = time.time()
        with self._lock:
            self._maybe_expire_locked(now)
            entry = self._entries.get(session_key)
            lcp = common_prefix(entry.tokens, prompt_ids) if entry is not None else 0
            if entry is not None and lcp < len(entry.tokens) and lcp < len(prompt_ids):
                # Edited history: cut back, but only after saves already queued for this session.
                ids = list(prompt_ids)
                self._saves.put(lambda: self._apply_cut(session_key, ids))
            if entry is None or lcp == 0:
                self._counters["lookups_miss"] += 1
                return Hit(0, None)
            on_disk = any(c.dram is None for c in entry.chunks_for(lcp))
            tier = "ssd" if on_disk else "dram"
            entry.last_used = now
            self._counters[f"lookups_hit_{tier}"] += 1
            return Hit(lcp, tier)

    def hint_upcoming(self, session_keys: list[str]) -> None:
        """The waiting queue's sessions, next first. The first K that fit in DRAM form the
        look-ahead window: protected from DRAM eviction and prefetched from SSD. No-op for "lru"."""
        if self.policy == "lru":
            return
        with self._lock:
            window: dict[str, int] = {}
            used = 0
            for key in dict.fromkeys(session_keys):
                entry = self._entries.get(key)
                if entry is None or not entry.tokens:
                    continue
                size = len(entry.tokens) * self.token_bytes
                if used + size > self.dram_bytes:
                    break
                used += size
                window[key] = len(window)
                needs = any(c.dram is None for c in entry.chunks)
                if needs and key not in self._prefetch_queued:
                    self._prefetch_queued.add(key)
                    self._io.put(lambda k=key: self._prefetch(k))
            self._window = window

    def start_load(self, session_key: str, num_tokens: int, blocks: BlockTable) -> LoadHandle:
        self._check_open()
        pieces: list[_Piece] = []
        with self._lock:
            entry = self._entries.get(session_key)
            if entry is None or len(entry.tokens) < num_tokens or num_tokens < 1:
                raise KVLoadError(f"session {session_key!r} does not hold {num_tokens} tokens")
            try:
                for c in entry.chunks_for(num_tokens):
                    count = min(c.n, num_tokens - c.start)
                    if c.dram is not None:
                        pieces.append(_Piece(c, c.start, count, c.dram, None))
                    else:
                        assert c.ssd is not None
                        pieces.append(_Piece(c, c.start, count, None, os.open(c.ssd.path, os.O_RDONLY)))
            except OSError as e:
                _close_fds(pieces)
                raise KVLoadError(f"chunk file of {session_key!r} is gone: {e}") from e
            for p in pieces:
                self._counters["tokens_reused_dram" if p.dram is not None else "tokens_reused_ssd"] += p.count
                if p.chunk.prefetched:
                    p.chunk.prefetched = False
                    self._counters["prefetches_used"] += 1
            entry.active_loads += 1
            entry.last_used = time.time()
        handle = LoadHandle(session_key, num_tokens, self.num_layers, self._readahead)
        # Stalls are charged to the slowest tier the load reads from.
        handle.tier = "dram" if all(p.dram is not None for p in pieces) else "ssd"
        self._handles.add(handle)
        slots = blocks.slots(self.pool.block_size, 0, num_tokens).to(self.pool.kv.device)
        after = self._streams.mark() if self._streams is not None else None  # the blocks' earlier users
        self._loads.put(lambda: self._run_load(handle, entry, pieces, slots, after))
        return handle

    def wait_layer(self, handle: LoadHandle, layer: int, timeout: float | None = None) -> None:
        stalled = handle.wait(layer, timeout)
        event = handle.event(layer)
        if event is not None and self._streams is not None:
            self._streams.wait(event)
        with self._lock:
            self._counters["load_stall_seconds"] += stalled
            self._counters[f"load_stall_seconds_{handle.tier}"] += stalled

    def save(self, session_key: str, token_ids: list[int], blocks: BlockTable, start: int, end: int) -> None:
        self._check_open()
        if end <= start:
            return
        kv = self.pool.read(blocks.slots(self.pool.block_size, start, end))  # a copy: the blocks may be freed now
        pending: torch.Tensor | HostCopy = kv if self._streams is None else self._streams.to_host(kv)
        ids = list(token_ids[:end])
        with self._lock:
            self._entry_locked(session_key).pending_saves += 1
        self._saves.put(lambda: self._apply_save(session_key, ids, start, pending))

    def finish(self, session_key: str, token_ids: list[int]) -> None:
        self._check_open()
        ids = list(token_ids)
        self._saves.put(lambda: self._apply_finish(session_key, ids))

    def truncate(self, session_key: str, keep_head: int, drop_end: int) -> int:
        """Drop stored tokens [keep_head, drop_end) and re-rotate the later keys to their new
        positions; returns the tokens now stored. Blocks until done (after pending saves)."""
        self._check_open()
        if self.rope_inv_freq is None:
            raise ValueError("truncate needs rope_inv_freq")
        done = threading.Event()
        result: list[int | BaseException] = []

        def op() -> None:
            try:
                result.append(self._apply_truncate(session_key, keep_head, drop_end))
            except BaseException as e:  # handed back to the caller's thread
                result.append(e)
            finally:
                done.set()

        self._saves.put(op)
        done.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def tokens(self, session_key: str) -> list[int]:
        """The session's stored token ids once its pending saves are applied (empty: no entry)."""
        self._check_open()
        done = threading.Event()
        result: list[int] = []

        def op() -> None:
            try:
                with self._lock:
                    entry = self._entries.get(session_key)
                    result.extend(entry.tokens if entry is not None else [])
            finally:
                done.set()

        self._saves.put(op)  # behind the saves already queued for the session
        done.wait()
        return result

    def pin(self, session_key: str, seconds: float) -> None:
        """Keep the session regardless of LRU and TTL for ``seconds`` (0 unpins)."""
        with self._lock:
            self._pins[session_key] = time.time() + seconds

    def delete(self, session_key: str) -> bool:
        with self._lock:
            entry = self._entries.pop(session_key, None)
            self._pins.pop(session_key, None)
            if entry is None:
                return False
            self._drop_all_locked(entry)
            return True

    def info(self, session_key: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(session_key)
            if entry is None:
                return None
            in_dram = sum(c.n for c in entry.chunks if c.dram is not None)
            on_ssd = sum(c.n for c in entry.chunks if c.on_ssd)
            tier = None if not entry.tokens else "dram" if in_dram == len(entry.tokens) else "ssd"
            return {"session_key": entry.key, "tokens": len(entry.tokens), "tier": tier,
                    "tokens_dram": in_dram, "tokens_ssd": on_ssd, "dram_bytes": entry.dram_bytes(),
                    "ssd_bytes": entry.ssd_bytes(), "chunks": len(entry.chunks),
                    "last_used": entry.last_used, "pinned_until": self._pins.get(entry.key, 0.0),
                    "in_window": entry.key in self._window, "pending_saves": entry.pending_saves}

    def sessions(self) -> list[str]:
        with self._lock:
            return [k for k, e in self._entries.items() if e.tokens]

    def stats(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = {k: float(v) for k, v in self._counters.items()}
            for name in ("lookups_hit_dram", "lookups_hit_ssd", "lookups_miss", "tokens_reused_dram",
                         "tokens_reused_ssd", "bytes_loaded_dram", "bytes_loaded_ssd", "bytes_saved_dram",
                         "bytes_saved_ssd", "load_seconds", "load_stall_seconds", "load_stall_seconds_dram",
                         "load_stall_seconds_ssd", "evictions_dram",
                         "evictions_ssd", "expirations", "prefetches_issued", "prefetches_used",
                         "corrupt_chunks_discarded", "temp_files_removed", "saves_dropped", "load_errors"):
                out.setdefault(name, 0.0)
            out["load_overlap_seconds"] = max(0.0, out["load_seconds"] - out["load_stall_seconds"])
            out["occupancy_bytes_dram"] = float(self._dram_used)
            out["occupancy_bytes_ssd"] = float(self._ssd_used)
            out["capacity_bytes_dram"] = float(self.dram_bytes)
            out["capacity_bytes_ssd"] = float(self.ssd_bytes)
            out["sessions"] = float(sum(1 for e in self._entries.values() if e.tokens))
            return out

    def flush(self) -> None:
        """Wait until every queued save and write-back is done."""
        if self._closed:
            return
        self._saves.join()
        self._io.join()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        with self._lock:  # shutdown: whatever DRAM holds that the SSD lacks is written now
            for key, entry in self._entries.items():
                if any(c.dirty for c in entry.chunks):
                    self._queue_writeback_locked(key)
        self.flush()
        self._closed = True
        for handle in list(self._handles):
            handle.cancel()
        for q in (self._saves, self._io, self._loads):
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)

    # ------------------------------------------------------------------ workers

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the KV store is closed")

    def _worker(self, jobs: queue.Queue[Callable[[], None] | None], idle: Callable[[], None] | None) -> None:
        while True:
            try:
                job = jobs.get(timeout=0.5 if idle is not None else None)
            except queue.Empty:
                assert idle is not None
                idle()
                continue
            try:
                if job is None:
                    return
                job()
            except Exception:
                log.exception("KV store background job failed")
                with self._lock:
                    self._counters["background_errors"] += 1
            finally:
                jobs.task_done()

    def _periodic(self) -> None:
        with self._lock:
            self._maybe_expire_locked(time.time())

    def _apply_save(self, key: str, ids: list[int], start: int, pending: torch.Tensor | HostCopy) -> None:
        kv = pending.wait() if isinstance(pending, HostCopy) else pending.to("cpu")
        with self._lock:
            entry = self._entry_locked(key)
            entry.pending_saves = max(0, entry.pending_saves - 1)
            lcp = common_prefix(entry.tokens, ids)
            if lcp < len(entry.tokens):
                self._cut_locked(entry, lcp)
            if lcp < start:  # the KV of [lcp, start) is nowhere: storing more would leave a hole
                self._counters["saves_dropped"] += 1
                return
            entry.last_used = time.time()
        if lcp < len(ids):
            self._append(entry, ids, lcp, kv[:, :, lcp - start:])

    def _apply_finish(self, key: str, ids: list[int]) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            lcp = common_prefix(entry.tokens, ids)
            if lcp < len(entry.tokens):
                self._cut_locked(entry, lcp)
            entry.last_used = time.time()
            self._queue_writeback_locked(key)

    def _apply_cut(self, key: str, prompt: list[int]) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            lcp = common_prefix(entry.tokens, prompt)
            if lcp < len(entry.tokens) and lcp < len(prompt):
                self._cut_locked(entry, lcp)
                self._queue_writeback_locked(key)

    def _apply_truncate(self, key: str, keep_head: int, drop_end: int) -> int:
        assert self.rope_inv_freq is not None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(key)
            if not 0 <= keep_head <= drop_end <= len(entry.tokens):
                raise ValueError(f"bad drop range [{keep_head}, {drop_end}) of {len(entry.tokens)} tokens")
            old_tokens = list(entry.tokens)
            pieces = [(c, c.n, c.dram, c.ssd.path if c.dram is None and c.ssd else None) for c in entry.chunks]
            entry.active_loads += 1  # keeps its chunks from being evicted while read
        try:
            parts = [dram[:, :, :n] if dram is not None else self._read_chunk(chunk, path, n)
                     for chunk, n, dram, path in pieces]
        finally:
            with self._lock:
                entry.active_loads -= 1
        kv = torch.cat(parts, dim=2) if parts else torch.empty(
            (self.num_layers, 2, 0, self.layout.num_kv_heads, self.layout.head_dim), dtype=self.layout.dtype)
        new_kv = drop_and_reposition(kv, keep_head, drop_end, self.rope_inv_freq)
        new_tokens = drop_tokens(old_tokens, keep_head, drop_end)
        with self._lock:
            if self._entries.get(key) is not entry or entry.tokens != old_tokens:
                raise KVLoadError(f"session {key!r} changed during truncation")
            self._cut_locked(entry, 0)
            entry.pending_saves += 1  # an empty entry must not expire before it is refilled
        try:
            self._append(entry, new_tokens, 0, new_kv)
        finally:
            with self._lock:
                entry.pending_saves -= 1
        with self._lock:
            self._queue_writeback_locked(key)
            return len(entry.tokens)

    def _append(self, entry: SessionEntry, ids: list[int], pos: int, kv: torch.Tensor) -> None:
        """Store KV of tokens ids[pos:] (kv holds exactly those) into the entry's DRAM chunks."""
        done = 0
        total = len(ids) - pos
        for _attempt in range(64 + 4 * total):
            if done == total:
                return
            with self._lock:
                if self._entries.get(entry.key) is not entry or len(entry.tokens) != pos + done:
                    self._counters["saves_dropped"] += 1
                    return
                target, take, extra = self._plan_locked(entry, total - done)
                fits = self._dram_used + extra <= self.dram_bytes
                if fits:
                    self._write_dram_locked(entry, target, ids[pos + done:pos + done + take],
                                            kv[:, :, done:done + take])
                    done += take
                    continue
            if not self._make_dram_room(extra, protect=target):
                with self._lock:
                    self._counters["saves_dropped"] += 1
                return
        with self._lock:
            self._counters["saves_dropped"] += 1

    def _plan_locked(self, entry: SessionEntry, remaining: int) -> tuple[Chunk | None, int, int]:
        """Where the next tokens go: (chunk to append to or None for a new one, tokens, extra DRAM bytes)."""
        last = entry.chunks[-1] if entry.chunks else None
        if last is not None and last.dram is not None and last.n < self.chunk_tokens:
            take = min(self.chunk_tokens - last.n, remaining)
            cap = last.dram.shape[2]
            new_cap = cap if last.n + take <= cap else min(self.chunk_tokens, max(last.n + take, 2 * cap))
            return last, take, (new_cap - cap) * self.token_bytes
        take = min(self.chunk_tokens, remaining)
        return None, take, min(self.chunk_tokens, max(take, _MIN_CAPACITY)) * self.token_bytes

    def _write_dram_locked(self, entry: SessionEntry, target: Chunk | None, ids: list[int],
                           kv: torch.Tensor) -> None:
        take = len(ids)
        if target is None:
            start = len(entry.tokens)
            cap = min(self.chunk_tokens, max(take, _MIN_CAPACITY))
            target = Chunk(index=len(entry.chunks), start=start)
            target.dram = torch.empty((self.num_layers, 2, cap, *kv.shape[3:]), dtype=kv.dtype, pin_memory=self._pin)
            entry.chunks.append(target)
            self._dram_used += target.dram.nbytes
        assert target.dram is not None
        if target.n + take > target.dram.shape[2]:
            new_cap = min(self.chunk_tokens, max(target.n + take, 2 * target.dram.shape[2]))
            grown = torch.empty((self.num_layers, 2, new_cap, *kv.shape[3:]), dtype=kv.dtype, pin_memory=self._pin)
            grown[:, :, :target.n] = target.dram[:, :, :target.n]
            self._dram_used += grown.nbytes - target.dram.nbytes
            target.dram = grown  # a loader holding the old tensor still reads valid [:n]
        target.dram[:, :, target.n:target.n + take] = kv
        target.n += take
        target.version += 1
        entry.tokens.extend(ids)
        self._counters["bytes_saved_dram"] += take * self.token_bytes
        if target.n >= self.chunk_tokens:
            self._queue_writeback_locked(entry.key)

    # ------------------------------------------------------------------ tiers: DRAM

    def _make_dram_room(self, need: int, *, protect: Chunk | None = None, clean_only: bool = False,
                        window_too: bool = True, exclude: str | None = None) -> bool:
        """Evict DRAM chunks (writing dirty ones back to SSD first) until ``need`` more bytes fit.

        Called without the lock; returns False if not enough can go.
        """
        for _ in range(100000):
            with self._lock:
                if self._dram_used + need <= self.dram_bytes:
                    return True
                victim = self._dram_victim_locked(protect, clean_only, window_too, exclude)
                if victim is None:
                    return False
                entry, chunk = victim
                if not chunk.dirty or self.ssd_dir is None:
                    self._evict_dram_chunk_locked(entry, chunk)
                    continue
            ok = self._write_chunk(entry, chunk)
            with self._lock:
                if chunk.dram is not None and any(c is chunk for c in entry.chunks) and (ok or chunk.dirty):
                    self._evict_dram_chunk_locked(entry, chunk)
        return False

    def _dram_victim_locked(self, protect: Chunk | None, clean_only: bool, window_too: bool,
                            exclude: str | None) -> tuple[SessionEntry, Chunk] | None:
        order = eviction_order(self._entries.values(), policy=self.policy, window=self._window,
                               pinned=self._pinned_locked(), exclude={exclude} if exclude else set())
        for entry in order:
            if not window_too and entry.key in self._window:
                continue
            for chunk in reversed(entry.chunks):  # the tail first: the head is what the next turn needs first
                if chunk.dram is None or chunk is protect or (clean_only and chunk.dirty):
                    continue
                return entry, chunk
        return None

    def _evict_dram_chunk_locked(self, entry: SessionEntry, chunk: Chunk) -> None:
        lost = chunk.dirty
        self._dram_used -= chunk.dram_bytes
        chunk.dram = None
        chunk.prefetched = False
        self._counters["evictions_dram"] += 1
        if lost:  # no SSD copy: the session ends where this chunk began
            self._counters["chunks_lost_dram"] += 1
            self._cut_locked(entry, chunk.start)

    # ------------------------------------------------------------------ tiers: SSD

    def _write_chunk(self, entry: SessionEntry, chunk: Chunk) -> bool:
        """Write one chunk to SSD (temp file, fsync, rename). Called without the lock."""
        if self.ssd_dir is None:
            return False
        with self._lock:
            if self._entries.get(entry.key) is not entry or not any(c is chunk for c in entry.chunks):
                return False
            if not chunk.dirty:
                return True
            assert chunk.dram is not None
            n, version, data = chunk.n, chunk.version, chunk.dram[:, :, :chunk.n]
            tokens = entry.tokens[:chunk.end]
            header = ChunkHeader(fingerprint=self.layout.fingerprint, session_key=entry.key,
                                 chunk_index=chunk.index, start=chunk.start, token_ids=tokens[chunk.start:],
                                 prefix_hash=prefix_hash(tokens), num_layers=self.num_layers,
                                 num_kv_heads=self.layout.num_kv_heads, head_dim=self.layout.head_dim,
                                 dtype=self.layout.dtype_name, layer_crc=[0xFFFFFFFF] * self.num_layers)
            # An upper bound: the real checksums print no longer than 0xFFFFFFFF.
            size = len(header.encode()) + self.num_layers * self.layout.layer_bytes(n)
            if not self._reserve_ssd_locked(size, entry.key):
                return False
        final = chunk_path(self.ssd_dir, entry.file_stem, chunk.index)
        tmp = final.with_name(f"{final.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            written = write_temp(tmp, header, data)
        except OSError:
            log.exception("writing KV chunk %s failed", tmp)
            _unlink(tmp)
            with self._lock:
                self._ssd_reserved -= size
            return False
        with self._lock:
            self._ssd_reserved -= size
            current = (self._entries.get(entry.key) is entry and any(c is chunk for c in entry.chunks)
                       and chunk.version == version and written <= size)
            if current:
                commit(tmp, final)
                if chunk.ssd is not None:
                    self._ssd_used -= chunk.ssd.nbytes  # the rename replaced that file
                chunk.ssd = SsdCopy(path=final, nbytes=written, file_tokens=n, valid_tokens=n)
                self._ssd_used += written
                self._counters["bytes_saved_ssd"] += written
        if not current:
            _unlink(tmp)
            return False
        fsync_dir(self.ssd_dir)
        return True

    def _reserve_ssd_locked(self, size: int, protect: str | None) -> bool:
        """Make room for ``size`` bytes on SSD (evicting whole sessions' files) and reserve it."""
        pinned = self._pinned_locked()
        while self._ssd_used + self._ssd_reserved + size > self.ssd_bytes:
            order = eviction_order(self._entries.values(), policy=self.policy, window=self._window,
                                   pinned=pinned, exclude={protect} if protect else set())
            victim = next((e for e in order if e.key not in pinned and e.ssd_bytes() > 0), None)
            if victim is None:
                return False
            for chunk in victim.chunks:
                if chunk.ssd is not None:
                    self._drop_ssd_locked(chunk)
            self._counters["evictions_ssd"] += 1
            self._repair_locked(victim)
        self._ssd_reserved += size
        return True

    def _drop_ssd_locked(self, chunk: Chunk) -> None:
        assert chunk.ssd is not None
        _unlink(chunk.ssd.path)
        self._ssd_used -= chunk.ssd.nbytes
        chunk.ssd = None

    def _queue_writeback_locked(self, key: str) -> None:
        if self.ssd_dir is not None and key not in self._writeback_queued:
            self._writeback_queued.add(key)
            self._io.put(lambda: self._writeback(key))

    def _writeback(self, key: str) -> None:
        with self._lock:
            self._writeback_queued.discard(key)
            entry = self._entries.get(key)
            if entry is None:
                return
            # A partial tail chunk still growing is written when its request finishes.
            todo = [c for c in entry.chunks if c.dirty and (c.n >= self.chunk_tokens or entry.pending_saves == 0)]
        for chunk in todo:
            self._write_chunk(entry, chunk)

    def _prefetch(self, key: str) -> None:
        """SSD -> DRAM for a look-ahead window session, evicting only clean chunks outside the window."""
        with self._lock:
            self._prefetch_queued.discard(key)
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None or key not in self._window:
                    return
                chunk = next((c for c in entry.chunks if c.dram is None and c.on_ssd), None)
                if chunk is None:
                    return
                assert chunk.ssd is not None
                n, version, path = chunk.n, chunk.version, chunk.ssd.path
            need = max(n, 1) * self.token_bytes
            if not self._make_dram_room(need, clean_only=True, window_too=False, exclude=key):
                return
            try:
                data = self._read_chunk(chunk, path, n)
            except (ChunkError, OSError):
                return
            if self._pin:
                data = data.pin_memory()
            with self._lock:
                if (self._entries.get(key) is not entry or chunk.dram is not None or chunk.version != version
                        or self._dram_used + data.nbytes > self.dram_bytes):
                    return
                chunk.dram = data
                chunk.prefetched = True
                self._dram_used += data.nbytes
                self._counters["prefetches_issued"] += 1
                self._counters["bytes_prefetched_ssd"] += data.nbytes

    def _read_chunk(self, chunk: Chunk, path: Path, n: int) -> torch.Tensor:
        """All layers of one chunk file, checked: [layers, 2, n, kv_heads, head_dim]."""
        fd = os.open(path, os.O_RDONLY)
        try:
            header, offset = read_header(fd, self.layout, os.fstat(fd).st_size)
            layers = [read_layer(fd, header, offset, self.layout, layer)[:, :n]
                      for layer in range(self.num_layers)]
        except ChunkError as e:
            self._discard_corrupt(chunk, fd, e)
            raise
        finally:
            os.close(fd)
        return torch.stack(layers)

    def _discard_corrupt(self, chunk: Chunk, fd: int, error: ChunkError) -> None:
        """A chunk file failed its check while in use: never serve it again."""
        log.warning("discarding corrupt KV chunk: %s", error)
        with self._lock:
            self._counters["corrupt_chunks_discarded"] += 1
            self._counters[f"chunks_discarded_{error.reason}"] += 1
            if chunk.ssd is None:
                return
            try:
                same = os.stat(chunk.ssd.path).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = True
            if same:
                self._drop_ssd_locked(chunk)
                for entry in self._entries.values():
                    if any(c is chunk for c in entry.chunks):
                        self._repair_locked(entry)
                        break

    # ------------------------------------------------------------------ loads

    def _run_load(self, handle: LoadHandle, entry: SessionEntry, pieces: list[_Piece], slots: torch.Tensor,
                  after: torch.cuda.Event | None) -> None:
        t0 = time.perf_counter()
        loaded = Counter[str]()
        current: _Piece | None = None
        streams = self._streams
        try:
            headers = {}
            for p in pieces:
                if p.fd is not None:
                    current = p
                    headers[id(p)] = read_header(p.fd, self.layout, os.fstat(p.fd).st_size)
            with streams.loading(after) if streams is not None and after is not None else nullcontext():
                for layer in range(self.num_layers):
                    if not handle.wait_room(layer):
                        return
                    dst = self.pool.slots_view
                    for p in pieces:
                        current = p
                        if p.dram is not None:
                            data = p.dram[layer, :, :p.count]
                            loaded["dram"] += data.nbytes
                        else:
                            assert p.fd is not None
                            header, offset = headers[id(p)]
                            data = read_layer(p.fd, header, offset, self.layout, layer)[:, :p.count]
                            loaded["ssd"] += data.nbytes
                        copy_kv_slots(dst, slots[layer, p.start:p.start + p.count], data, None)
                    handle.mark_ready(layer, streams.layer_loaded() if streams is not None else None)
        except ChunkError as e:
            assert current is not None and current.fd is not None
            self._discard_corrupt(current.chunk, current.fd, e)
            handle.fail(e)
            with self._lock:
                self._counters["load_errors"] += 1
        except Exception as e:
            handle.fail(e)
            with self._lock:
                self._counters["load_errors"] += 1
            raise
        finally:
            if streams is not None:
                streams.finish_loads()  # the pinned sources must outlive the copies reading them
            _close_fds(pieces)
            with self._lock:
                entry.active_loads -= 1
                self._counters["load_seconds"] += time.perf_counter() - t0
                self._counters["bytes_loaded_dram"] += loaded["dram"]
                self._counters["bytes_loaded_ssd"] += loaded["ssd"]

    # ------------------------------------------------------------------ index upkeep

    def _entry_locked(self, key: str) -> SessionEntry:
        entry = self._entries.get(key)
        if entry is None:
            entry = SessionEntry(key=key, file_stem=file_stem(key), last_used=time.time())
            self._entries[key] = entry
        return entry

    def _pinned_locked(self) -> set[str]:
        now = time.time()
        return {k for k, until in self._pins.items() if until > now}

    def _cut_locked(self, entry: SessionEntry, n: int) -> None:
        """Keep only the first ``n`` stored tokens."""
        keep: list[Chunk] = []
        for chunk in entry.chunks:
            if chunk.start >= n:
                self._drop_chunk_locked(chunk)
                continue
            if chunk.end > n:
                chunk.n = n - chunk.start
                chunk.version += 1
                if chunk.ssd is not None:
                    chunk.ssd.valid_tokens = min(chunk.ssd.valid_tokens, chunk.n)
                if chunk.dram is not None and entry.active_loads:
                    # Copy on write: a load in flight may still read the positions new tokens will overwrite.
                    old = chunk.dram
                    chunk.dram = old[:, :, :chunk.n].clone()
                    self._dram_used += chunk.dram.nbytes - old.nbytes
            keep.append(chunk)
        entry.chunks = keep
        del entry.tokens[n:]

    def _repair_locked(self, entry: SessionEntry) -> None:
        """After a tier dropped data: the session is readable up to its first chunk held nowhere."""
        for chunk in entry.chunks:
            if not chunk.servable:
                self._cut_locked(entry, chunk.start)
                return

    def _drop_chunk_locked(self, chunk: Chunk) -> None:
        if chunk.dram is not None:
            self._dram_used -= chunk.dram.nbytes
            chunk.dram = None
        if chunk.ssd is not None:
            self._drop_ssd_locked(chunk)

    def _drop_all_locked(self, entry: SessionEntry) -> None:
        for chunk in entry.chunks:
            self._drop_chunk_locked(chunk)
        entry.chunks = []
        entry.tokens = []

    def _maybe_expire_locked(self, now: float) -> None:
        if now >= self._next_expiry:
            self._next_expiry = now + min(1.0, self.ttl_s / 4)
            self._expire_locked(now)

    def _expire_locked(self, now: float) -> None:
        """TTL: a session idle for ttl_s leaves every tier (unless pinned, queued, or in use)."""
        pinned = self._pinned_locked()
        for key, entry in list(self._entries.items()):
            if key in pinned or key in self._window or entry.active_loads or entry.pending_saves:
                continue
            if now - entry.last_used > self.ttl_s or not entry.chunks:
                if entry.chunks:
                    self._counters["expirations"] += 1
                self._drop_all_locked(entry)
                del self._entries[key]
        self._pins = {k: v for k, v in self._pins.items() if v > now}


def _close_fds(pieces: list[_Piece]) -> None:
    for p in pieces:
        if p.fd is not None:
            os.close(p.fd)
            p.fd = None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
