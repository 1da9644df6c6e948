"""CachedAttention: session-keyed KV reuse across the DRAM and SSD tiers.

The engine owns HBM (the :class:`BlockPool` and its cached blocks); this store keeps every session's KV
in host memory (DRAM) and in chunk files (SSD), and moves it in and out of device blocks. What sessions of
one tenant have in common (a system prompt, a tool list, a document) is stored once, in every tier: a
session is a list of chunks, and a whole chunk of plain model KV is shared by content (see
:mod:`.session_index`, :mod:`.content_chain`); a new session's first request starts from it. ``lookup``
never reports the ``"hbm"`` tier: an HBM hit is the engine's business, it asks the store only on a miss.

:class:`KVStore` is the one object the engine holds; it wires together and delegates to the parts,
split as vLLM v1 splits its KV connector into a scheduler side and a worker side:

* scheduler side (engine thread, no I/O): :mod:`.session_index` (entries, lookup, cuts, TTL, pins, the
  look-ahead window, budgets, counters; its lock guards all the parts); :mod:`.kv_preparer` does, on its own
  thread, what a request must wait for before it is scheduled (shared-tier import, truncation, SSD reads);
* tiers: :mod:`.dram_tier` (appending into DRAM chunks, making room) and :mod:`.ssd_tier` (chunk files,
  write-back, prefetch, the I/O thread; start-up scan in :mod:`.ssd_scan`, format in :mod:`.chunk_file`);
* worker side: :mod:`.kv_loader` (the loader thread, layer by layer) and :mod:`.kv_saver` (the saver
  thread, a byte-bounded queue); :mod:`.truncation` (context overflow, on the saver thread).

Interface (all methods are called from the engine thread and never block on I/O, except ``flush`` and
``close`` (shutdown), ``truncate`` and ``tokens`` (the preparer's thread), and ``wait_layer`` (a layer the
forward pass needs), each bounded by a timeout)::

    store = KVStore(pool, model_fingerprint=..., dram_bytes=..., ssd_dir=Path | None, ssd_bytes=...,
                    policy="scheduler" | "lru", ttl_s=3600.0, chunk_tokens=256,
                    rope_inv_freq=None, readahead_layers=None, save_queue_bytes=256 MiB,
                    remote=RemoteBackend | None, signer=ChunkSigner | None)   # a shared tier needs both
    store.prepare(key, prompt_ids, truncate, done, share=True)  # before scheduling; done(Prepared), its thread
    store.lookup(key, prompt_ids) -> Hit(tokens, tier)   # tier "dram" | "ssd" | "remote" | None; pure
    store.hint_upcoming(keys)                            # waiting queue order, first = next
    store.start_load(key, token_ids, num_tokens, blocks) -> LoadHandle   # blocks: a BlockTable
    store.wait_layer(handle, layer, timeout=None)        # raises KVLoadError: recompute instead
    store.save(key, token_ids, blocks, start, end)       # copies KV [start, end) out of the blocks now
    store.finish(key, token_ids)
    store.truncate(key, keep_head, drop_end, timeout=10.0) -> int   # context overflow, re-rotates kept keys
    store.tokens(key, timeout=10.0) -> list[int]         # stored ids, after pending saves
    store.pin(key, seconds); store.delete(key) -> bool; store.info(key) -> dict | None
    store.sessions() -> list[str]; store.stats() -> dict[str, float]
    store.import_remote(key, prompt_ids) -> RemoteImport # any thread: a session from the shared tier (remote=)
    store.flush(timeout=None) -> bool; store.close(timeout=30.0)

Semantics the engine relies on:

* ``prepare`` runs once per session request before it is scheduled; ``done`` always comes, after which
  the session starts with the shared chunks its prompt starts with (when they cover more of it than the
  session's own history) and the SSD part of its reusable prefix is in DRAM where DRAM had room. If the
  prompt diverges from the stored ids (edited history), the entry is cut back to the divergence point
  (after any pending saves).
* ``lookup`` returns the longest common prefix of ``prompt_ids`` and the tokens whose save has
  completed; it may equal ``len(prompt_ids)``, the engine must still compute at least the last prompt
  token. It changes nothing: the scheduler may ask as often as it likes.
* ``start_load`` checks, under the lock that also pins down the data, that the entry still holds
  ``token_ids[:num_tokens]`` (the requesting sequence's ids) and raises KVLoadError otherwise: a session
  edited between ``lookup`` and ``start_load`` never hands out KV of other tokens. ``blocks`` covers
  tokens ``[0, num_tokens)`` at every layer. Layers arrive in order; with ``readahead_layers`` set the
  loader runs at most that many layers ahead of the last ``wait_layer``.
* Delayed free: the loader writes into ``blocks`` until ``handle.released`` is True. After
  ``handle.cancel()`` the blocks may be freed or reused only once ``released`` (set by the loader when it
  stops, or at once if the load had not begun).
* Timeouts: ``wait_layer`` (counted as ``load_timeouts``), ``tokens`` and ``truncate`` raise KVLoadError
  when theirs expires (the engine recomputes); ``flush`` returns False; ``close`` logs and returns.
* ``save`` takes ``token_ids`` (the session's tokens, at least ``end`` of them) and stores only what
  the entry lacks: tokens before the longest common prefix with the stored ids are skipped, and a save
  that would leave a gap is dropped (``saves_dropped``).
* Bounded save queue: at most ``save_queue_bytes`` of KV copies wait for the saver. A save that does not
  fit is dropped before any copy and without waiting (``saves_dropped_queue_full``); the session's stored
  KV then ends before it, its later saves would leave a hole and are dropped, and the next turn
  recomputes from there. A save is admitted whenever nothing is waiting, so one larger than the bound
  still gets through. ``save_queue_bytes`` in ``stats()`` is the current occupancy.
* Chunks are written back to SSD in the background once full, and the rest when the request
  ``finish``-es; DRAM eviction of a written chunk is then a drop.
* ``delete`` drops the session from every tier at once; saves queued before it are dropped when they
  come up (``saves_dropped_deleted``), so a deletion during a turn sticks. With a shared tier it leaves a
  tombstone there (see :mod:`.remote_tier`).
* Sessions survive a restart through the SSD tier; pins and the look-ahead window do not. ``close``
  writes back every chunk DRAM holds that the SSD lacks.
* Eviction DRAM -> SSD picks chunks (tail first) of the victim session given by
  :func:`eviction_order`; a chunk with no SSD copy is written first, or, if it cannot be, dropped and
  the session cut back there. SSD eviction (budget full) removes a whole session's files; TTL expiry
  removes a session idle for ``ttl_s`` from every tier. Pinned sessions never leave SSD nor expire; in
  DRAM they go last.
* Budgets count chunk tensors (DRAM, by capacity) and chunk files (SSD, reserved before writing). Not
  counted: KV copies waiting in the save queue (bounded separately, above) and tensors still held by a
  load in flight after their chunk was dropped.

``stats()`` keys (flat, for Prometheus): ``lookups_hit_dram``, ``lookups_hit_ssd``, ``lookups_miss``,
``tokens_reused_{dram,ssd}`` (counted at ``start_load``), ``bytes_loaded_{dram,ssd}``,
``bytes_saved_{dram,ssd}``, ``load_seconds`` (loader busy), ``load_stall_seconds`` (runner blocked in
``wait_layer``; split by the slowest tier a load reads from as ``load_stall_seconds_{dram,ssd}``),
``load_overlap_seconds``, ``load_timeouts``, ``evictions_{dram,ssd}`` (DRAM: chunks, SSD: sessions),
``expirations``, ``occupancy_bytes_{dram,ssd}``, ``capacity_bytes_{dram,ssd}``, ``sessions``,
``prefetches_issued``, ``prefetches_used`` (chunks), ``corrupt_chunks_discarded``,
``chunks_discarded_<reason>`` (checksum, fingerprint, truncated, format, stale, io),
``temp_files_removed``, ``saves_dropped``, ``saves_dropped_queue_full``, ``save_queue_bytes``,
``load_errors``, ``ssd_io_queue`` (write-backs, prefetches and upkeep queued on the I/O thread); with a
shared tier ``lookups_hit_remote``, ``remote_uploads``, ``remote_uploads_dropped``,
``bytes_saved_remote``, ``remote_fetches``, ``remote_imports``, ``tokens_imported_remote``,
``remote_skipped_down``, ``remote_errors``, ``remote_chunks_discarded_<reason>`` (signature, oversize and
the local reasons), ``remote_deletions_applied``, ``remote_uploads_dropped_deleted``,
``remote_forgets_dropped``, ``remote_upload_queue``;
``saves_dropped_deleted`` (saves queued before their session's deletion).

On a GPU (the pool's device is CUDA) the DRAM tier is pinned host memory, loads run on a CUDA stream
with one event per layer (``wait_layer`` makes the caller's stream wait on it, the host does not block
on the copy) and saves copy to the host on a second stream; see :mod:`strata.storage.cuda_streams`.
Elsewhere the same threads copy with plain tensor ops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.chunk_file import ChunkLayout
from strata.storage.chunk_signing import ChunkSigner
from strata.storage.cuda_streams import CudaStreams
from strata.storage.dram_tier import DramTier
from strata.storage.injected_delays import NO_DELAYS, InjectedDelays
from strata.storage.kv_loader import KVLoader
from strata.storage.kv_preparer import KVPreparer, Prepared
from strata.storage.kv_saver import KVSaver
from strata.storage.load_handle import KVLoadError, LoadHandle
from strata.storage.remote_tier import RemoteBackend, RemoteImport, RemoteTier
from strata.storage.session_index import Hit, SessionIndex
from strata.storage.ssd_tier import SsdTier
from strata.storage.truncation import Truncator

log = logging.getLogger(__name__)

__all__ = ["Hit", "KVLoadError", "KVStore", "LoadHandle", "Prepared"]


class KVStore:
    def __init__(self, pool: BlockPool, *, model_fingerprint: str, dram_bytes: int, ssd_dir: Path | None,
                 ssd_bytes: int, policy: str = "scheduler", ttl_s: float = 3600.0, chunk_tokens: int = 256,
                 rope_inv_freq: torch.Tensor | None = None, readahead_layers: int | None = None,
                 save_queue_bytes: int = 256 << 20, remote: RemoteBackend | None = None,
                 signer: ChunkSigner | None = None, delays: InjectedDelays = NO_DELAYS,
                 tier_format: str = "model") -> None:
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
        self.layout = ChunkLayout(model_fingerprint, layers, heads, dim, pool.kv.dtype, tier_format)
        self.num_layers = layers
        self.token_bytes = self.layout.layer_bytes(1) * layers
        streams = CudaStreams(pool.kv.device) if pool.kv.is_cuda else None
        pin = streams is not None  # pinned DRAM chunks: async DMA, readable by the copy kernel

        self.index = SessionIndex(policy=policy, ttl_s=ttl_s, dram_bytes=dram_bytes, ssd_bytes=self.ssd_bytes,
                                  token_bytes=self.token_bytes, chunk_tokens=chunk_tokens, windows=pool.windows)
        self.ssd = SsdTier(self.index, self.layout, self.ssd_dir, chunk_tokens=chunk_tokens, pin=pin, delays=delays)
        self.ssd.open()
        self.dram = DramTier(self.index, self.ssd, num_layers=layers, chunk_tokens=chunk_tokens, pin=pin)
        self.loader = KVLoader(self.index, self.ssd, pool, self.layout, streams, readahead_layers or layers)
        self.saver = KVSaver(self.index, self.dram, self.ssd, pool, streams, save_queue_bytes, self.layout.codec)
        self.truncator = (Truncator(self.index, self.dram, self.ssd, self.layout, rope_inv_freq)
                          if rope_inv_freq is not None else None)
        # The shared tier rides on the SSD tier: what it writes is uploaded, what it lacks is imported.
        if remote is not None and signer is None:
            raise ValueError("a shared tier needs a signer: its chunks are signed")
        self.remote = (RemoteTier(remote, signer, self.index, model_fingerprint, ttl_s, delays=delays)
                       if remote is not None and signer is not None and self.ssd_dir is not None else None)
        if self.remote is not None:
            self.ssd.on_written = self.remote.upload
        self.preparer = KVPreparer(self)
        self._closed = False

    # ------------------------------------------------------------------ scheduler side

    def prepare(self, session_key: str, prompt_ids: list[int], truncate: bool,
                done: Callable[[Prepared], None], share: bool = True) -> None:
        """Before a session's request is scheduled: whatever storage work it needs (shared-tier import,
        context-overflow truncation, cut-back of an edited history, SSD -> DRAM), on the preparer's thread;
        ``done`` is called from there once (see :mod:`.kv_preparer`). ``share`` False: the session does not
        adopt other sessions' chunks (a request that keeps nothing must not leave an entry behind)."""
        if self._closed:
            done(Prepared())
            return
        self.preparer.prepare(session_key, prompt_ids, truncate, done, share)

    def lookup(self, session_key: str, prompt_ids: list[int]) -> Hit:
        """The longest stored prefix of the prompt and its tier; no side effects, no I/O."""
        return self.index.lookup(session_key, prompt_ids)[0]

    def hint_upcoming(self, session_keys: list[str]) -> None:
        """The waiting queue's sessions, next first. The first K that fit in DRAM form the
        look-ahead window: protected from DRAM eviction and prefetched from SSD. No-op for "lru"."""
        if self.policy == "lru":
            return
        self.ssd.queue_prefetch(self.index.set_window(session_keys), self.dram)

    def pin(self, session_key: str, seconds: float) -> None:
        """Keep the session regardless of LRU and TTL for ``seconds`` (0 unpins)."""
        self.index.pin(session_key, seconds)

    def delete(self, session_key: str) -> bool:
        """Forget the session in every tier; the chunks it shared stay for the sessions still holding them."""
        with self.index.lock:
            entry = self.index.entries.get(session_key)
            orphans = self.index.orphaned_digests_locked(entry) if entry is not None else []
            deleted = self.index.delete_locked(session_key)
        if self.remote is not None:
            self.remote.forget(session_key, orphans)
        return deleted

    def import_remote(self, session_key: str, prompt_ids: list[int]) -> RemoteImport:
        """Before a session's request: bring its KV from the shared tier into the SSD tier if this server
        lacks it, or drop what it holds if the session was deleted elsewhere. Any thread may call it (it
        takes the index lock); bounded by the remote's timeouts, and free when there is no shared tier."""
        if self.remote is None or self._closed:
            return RemoteImport(0)
        return self.remote.import_session(self.ssd, session_key, prompt_ids)

    def info(self, session_key: str) -> dict[str, Any] | None:
        return self.index.info(session_key)

    def sessions(self) -> list[str]:
        return self.index.sessions()

    def stats(self) -> dict[str, float]:
        out = self.index.stats()
        with self.index.lock:
            out["save_queue_bytes"] = float(self.saver.queued_bytes)
        out["ssd_io_queue"] = float(self.ssd.io.pending)
        # What one token of KV takes in the tiers, in the format they store (--kv-tier-dtype).
        out[f"tier_bytes_per_token_{self.layout.format}"] = float(self.token_bytes)
        if self.remote is not None:
            out["remote_upload_queue"] = float(self.remote.pending())
        return out

    # ------------------------------------------------------------------ worker side

    def start_load(self, session_key: str, token_ids: list[int], num_tokens: int, blocks: BlockTable) -> LoadHandle:
        """Load the KV of ``token_ids[:num_tokens]`` into ``blocks``; KVLoadError if the session no longer
        holds exactly those tokens."""
        self._check_open()
        return self.loader.start(session_key, token_ids, num_tokens, blocks)

    def wait_layer(self, handle: LoadHandle, layer: int, timeout: float | None = None) -> None:
        self.loader.wait_layer(handle, layer, timeout)

    def save(self, session_key: str, token_ids: list[int], blocks: BlockTable, start: int, end: int) -> None:
        self._check_open()
        if end > start:
            self.saver.save(session_key, token_ids, blocks, start, end)

    def finish(self, session_key: str, token_ids: list[int]) -> None:
        self._check_open()
        self.saver.finish(session_key, token_ids)

    def truncate(self, session_key: str, keep_head: int, drop_end: int, timeout: float | None = 10.0) -> int:
        """Drop stored tokens [keep_head, drop_end) and re-rotate the later keys to their new
        positions; returns the tokens now stored. Blocks until done (after pending saves)."""
        self._check_open()
        truncator = self.truncator
        if truncator is None:
            raise ValueError("truncate needs rope_inv_freq")
        return self.saver.call(lambda: truncator.apply(session_key, keep_head, drop_end), timeout)

    def adopt_shared(self, session_key: str, prompt_ids: list[int], timeout: float | None = 10.0) -> int:
        """Start the session with the stored content chunks its prompt starts with, if they cover more of it
        than its own history; after its pending saves. Returns the tokens adopted (the preparer's thread)."""
        self._check_open()
        if not self.index.adoptable(session_key, prompt_ids) and (self.index.holds(session_key)
                                                                  or not self.saver.busy):
            # A new session asks again behind the queued saves, which may register the chunks it needs (the
            # previous conversation's); a session with history of its own does not wait for them.
            return 0

        def adopt() -> int:
            with self.index.lock:
                return self.index.adopt_shared_locked(session_key, prompt_ids)

        try:
            return self.saver.call(adopt, timeout)
        except KVLoadError:
            return 0

    def tokens(self, session_key: str, timeout: float | None = 10.0) -> list[int]:
        """The session's stored token ids once its pending saves are applied (empty: no entry)."""
        self._check_open()

        def read() -> list[int]:
            with self.index.lock:
                entry = self.index.entries.get(session_key)
                return list(entry.tokens) if entry is not None else []

        return self.saver.call(read, timeout)  # behind the saves already queued for the session

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued save and write-back is done; False if ``timeout`` expired first."""
        if self._closed:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.saver.thread.join(timeout) and self.ssd.io.join(_left(deadline))

    def close(self, timeout: float | None = 30.0) -> None:
        """Apply pending saves, write back what the SSD lacks, stop the threads. Never waits longer than
        ``timeout``: what is not done by then is logged and left (it is lost at exit)."""
        if self._closed:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.flush(_left(deadline)):
            self.ssd.writeback_all()  # shutdown: whatever DRAM holds that the SSD lacks is written now
            done = self.flush(_left(deadline))
        else:
            done = False
        if not done:
            log.warning("KV store closed after %s s with saves or write-backs still pending", timeout)
        self._closed = True
        self.loader.cancel_all()
        threads = [self.preparer.thread, self.saver.thread, self.ssd.io, self.loader.thread]
        threads += [self.remote.uploader] if self.remote is not None else []
        for thread in threads:
            thread.stop(10.0 if deadline is None else _left(deadline))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the KV store is closed")


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
