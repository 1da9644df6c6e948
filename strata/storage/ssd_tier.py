"""The SSD tier: chunk files under ``ssd_dir``, written back from DRAM and prefetched into it.

Writes go to a temporary name, are fsynced and renamed (see chunk_file), so a crash never leaves a
half-written chunk under a real name. A content chunk (shared by sessions, see session_index) is one file
named by its digest; each session's manifest lists the content chunks it starts with. The disk budget is
reserved before a file is written; making room removes sessions' files, those other sessions share last.
Background work (write-back, prefetch, TTL upkeep) runs on the I/O thread.
The start-up scan that rebuilds the index lives in ssd_scan.py.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from strata.storage import session_manifest
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
from strata.storage.content_chain import scope_of
from strata.storage.eviction import eviction_order
from strata.storage.injected_delays import NO_DELAYS, InjectedDelays
from strata.storage.job_thread import JobThread
from strata.storage.session_entry import Chunk, SessionEntry, SsdCopy
from strata.storage.session_index import SessionIndex, unlink
from strata.storage.ssd_scan import chunk_path, content_path, scan_directory

if TYPE_CHECKING:
    from strata.storage.dram_tier import DramTier

log = logging.getLogger(__name__)


class SsdTier:
    def __init__(self, index: SessionIndex, layout: ChunkLayout, ssd_dir: Path | None, *, chunk_tokens: int,
                 pin: bool, delays: InjectedDelays = NO_DELAYS) -> None:
        self.index = index
        self.delays = delays
        self.layout = layout
        self.dir = ssd_dir  # None: no SSD tier (DRAM only); the I/O thread still runs TTL upkeep
        self.chunk_tokens = chunk_tokens
        self._pin = pin
        self._writeback_queued: set[str] = set()  # guarded by index.lock, like everything it indexes
        self._prefetch_queued: set[str] = set()
        self.io = JobThread("kv-io", lambda: index.count("background_errors"), idle=index.expire_periodic)
        # Called with each chunk file once written (path, the chunk's name in the shared tier, when its
        # session was created; 0 for a content chunk, which belongs to no session): the shared tier.
        self.on_written: Callable[[Path, str, float], None] | None = None

    def open(self) -> None:
        """Rebuild the index from the directory, then fit the budget (it may be smaller than last time)."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index.adopt_scan(scan_directory(self.dir, self.layout))
        with self.index.lock:
            self.reserve_locked(0, None)
            self.index.ssd_reserved = 0
            self.index.expire_locked(time.time())

    # ------------------------------------------------------------------ writing

    def write_chunk(self, entry: SessionEntry, chunk: Chunk) -> bool:
        """Write one chunk to SSD (temp file, fsync, rename). Called without the lock."""
        if self.dir is None:
            return False
        index, layout = self.index, self.layout
        with index.lock:
            if not index.live_locked(chunk):
                return False
            if not chunk.dirty:
                return True
            assert chunk.dram is not None
            n, version, data = chunk.n, chunk.version, chunk.dram[:, :, :chunk.n]
            tokens = entry.tokens[:chunk.end]
            digest = chunk.digest
            held = chunk.held_layers
            rows = len(held) if held is not None else layout.num_layers
            header = ChunkHeader(fingerprint=layout.fingerprint, session_key="" if digest else entry.key,
                                 chunk_index=chunk.index, start=chunk.start, token_ids=tokens[chunk.start:],
                                 prefix_hash=prefix_hash(tokens), num_layers=layout.num_layers,
                                 num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                                 dtype=layout.dtype_name, layer_crc=[0xFFFFFFFF] * rows,
                                 digest=digest or "", parent=chunk.parent if digest else "",
                                 scope=(scope_of(entry.key) or "") if digest else "", layers=list(held or ()),
                                 format=layout.header_format)
            # An upper bound: the real checksums print no longer than 0xFFFFFFFF.
            size = len(header.encode()) + rows * layout.layer_bytes(n)
            if not self.reserve_locked(size, entry.key):
                return False
        final = content_path(self.dir, digest) if digest else chunk_path(self.dir, entry.file_stem, chunk.index)
        tmp = final.with_name(f"{final.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            written = write_temp(tmp, header, data)
        except OSError:
            log.exception("writing KV chunk %s failed", tmp)
            unlink(tmp)
            with index.lock:
                index.ssd_reserved -= size
            return False
        with index.lock:
            index.ssd_reserved -= size
            # The chunk may have changed (a save, a cut, no longer content) while its file was written: then
            # it is stale.
            current = (index.live_locked(chunk) and chunk.version == version and chunk.digest == digest
                       and chunk.held_layers == held and written <= size)
            if current:
                commit(tmp, final)
                if chunk.ssd is not None:
                    index.ssd_used -= chunk.ssd.nbytes  # the rename replaced that file
                chunk.ssd = SsdCopy(path=final, nbytes=written, file_tokens=n, valid_tokens=n, held_layers=held)
                index.ssd_used += written
                index.counters["bytes_saved_ssd"] += written
        if not current:
            unlink(tmp)
            return False
        fsync_dir(self.dir)
        if self.on_written is not None:
            name = f"c:{digest}" if digest else f"{entry.file_stem}:{chunk.index:06d}"
            self.on_written(final, name, 0.0 if digest else entry.created)
        return True

    def write_manifest(self, entry: SessionEntry) -> None:
        """(Re)write the session's manifest when the content chunks it starts with changed. Called without
        the lock, on the I/O thread (the only writer of manifests)."""
        assert self.dir is not None
        with self.index.lock:
            if self.index.entries.get(entry.key) is not entry:
                return
            refs = entry.content_refs()
            if refs == entry.refs_written and (refs or entry.manifest is None):
                return
            path = session_manifest.manifest_path(self.dir, entry.file_stem)
            created = entry.created
        try:
            if refs:
                session_manifest.write(path, entry.key, created, refs)
            else:
                unlink(path)
        except OSError:
            log.exception("writing the manifest of a session failed")
            return
        with self.index.lock:
            if self.index.entries.get(entry.key) is entry:
                entry.manifest, entry.refs_written = (path if refs else None), refs
            elif refs:  # deleted meanwhile: its manifest goes too
                unlink(path)

    def reserve_locked(self, size: int, protect: str | None) -> bool:
        """Make room for ``size`` bytes on SSD (evicting sessions' files: first what no other session shares,
        then shared chunks) and reserve it."""
        index = self.index
        pinned = index.pinned_locked()
        shared_too = False
        while index.ssd_used + index.ssd_reserved + size > index.ssd_bytes:
            order = eviction_order(index.entries.values(), policy=index.policy, window=index.window,
                                   pinned=pinned, exclude={protect} if protect else set())
            victim = next((e for e in order if e.key not in pinned and any(
                c.ssd is not None and (shared_too or not c.shared)
                and (protect is None or protect not in c.owners) for c in e.chunks)), None)
            if victim is None:
                if shared_too:
                    return False
                shared_too = True
                continue
            dropped = [c for c in victim.chunks if c.ssd is not None and (shared_too or not c.shared)
                       and (protect is None or protect not in c.owners)]
            for chunk in dropped:
                index.drop_ssd_locked(chunk)
            index.counters["evictions_ssd"] += 1
            for chunk in dropped:
                index.repair_owners_locked(chunk)
        index.ssd_reserved += size
        return True

    def queue_writeback_locked(self, key: str) -> None:
        if self.dir is not None and key not in self._writeback_queued:
            self._writeback_queued.add(key)
            self.io.put(lambda: self._writeback(key))

    def _writeback(self, key: str) -> None:
        with self.index.lock:
            self._writeback_queued.discard(key)
            entry = self.index.entries.get(key)
            if entry is None:
                return
            # A partial tail chunk still growing is written when its request finishes.
            todo = [c for c in entry.chunks if c.dirty and (c.n >= self.chunk_tokens or entry.pending_saves == 0)]
        for chunk in todo:
            self.write_chunk(entry, chunk)
        self.write_manifest(entry)

    def writeback_all(self) -> None:
        """Shutdown: queue every session whose DRAM holds what the SSD lacks."""
        with self.index.lock:
            for key, entry in self.index.entries.items():
                if any(c.dirty for c in entry.chunks):
                    self.queue_writeback_locked(key)

    # ------------------------------------------------------------------ prefetch SSD -> DRAM

    def queue_prefetch(self, keys: list[str], dram: DramTier) -> None:
        with self.index.lock:
            for key in keys:
                if key not in self._prefetch_queued:
                    self._prefetch_queued.add(key)
                    self.io.put(lambda k=key: self._prefetch(k, dram))

    def _prefetch(self, key: str, dram: DramTier) -> None:
        """SSD -> DRAM for a look-ahead window session, evicting only clean chunks outside the window."""
        with self.index.lock:
            self._prefetch_queued.discard(key)
        self.prefetch(key, dram, in_window=True)

    def prefetch(self, key: str, dram: DramTier, *, in_window: bool, num_tokens: int | None = None) -> None:
        """Read the session's chunks that only the SSD holds (those covering its first ``num_tokens``, or
        all) into DRAM, evicting only clean chunks outside the window; stops at the first that does not fit
        or fails its check. ``in_window``: only while the session is in the look-ahead window."""
        index = self.index
        while True:
            with index.lock:
                entry = index.entries.get(key)
                if entry is None or (in_window and key not in index.window):
                    return
                chunks = entry.chunks if num_tokens is None else entry.chunks_for(num_tokens)
                chunk = next((c for c in chunks if c.dram is None and c.on_ssd), None)
                if chunk is None:
                    return
                assert chunk.ssd is not None
                n, version, path = chunk.n, chunk.version, chunk.ssd.path
            need = max(n, 1) * index.token_bytes
            if not dram.make_room(need, clean_only=True, window_too=False, exclude=key):
                return
            try:
                data = self.read_chunk(chunk, path, n)
            except (ChunkError, OSError):
                return
            if self._pin:
                data = data.pin_memory()
            with index.lock:
                if (index.entries.get(key) is not entry or chunk.dram is not None or chunk.version != version
                        or index.dram_used + data.nbytes > index.dram_bytes):
                    return
                chunk.dram = data
                chunk.prefetched = True
                index.dram_used += data.nbytes
                index.counters["prefetches_issued"] += 1
                index.counters["bytes_prefetched_ssd"] += data.nbytes

    # ------------------------------------------------------------------ reading

    def read_chunk(self, chunk: Chunk, path: Path, n: int) -> torch.Tensor:
        """The layers one chunk file holds (the chunk's ``held_layers``), checked, as stored: [held, 2, n,
        kv_heads, width]."""
        self.delays.before_ssd_read()
        fd = os.open(path, os.O_RDONLY)
        try:
            header, offset = read_header(fd, self.layout, os.fstat(fd).st_size)
            if header.held_layers != chunk.held_layers:
                raise ChunkError("format", f"layers {header.layers}, the index says {chunk.held_layers}")
            layers = [read_layer(fd, header, offset, self.layout, layer)[:, :n] for layer in header.held]
        except ChunkError as e:
            self.discard_corrupt(chunk, fd, e)
            raise
        finally:
            os.close(fd)
        return torch.stack(layers)

    def discard_corrupt(self, chunk: Chunk, fd: int, error: ChunkError) -> None:
        """A chunk file failed its check while in use: never serve it again."""
        log.warning("discarding corrupt KV chunk: %s", error)
        index = self.index
        with index.lock:
            index.counters["corrupt_chunks_discarded"] += 1
            index.counters[f"chunks_discarded_{error.reason}"] += 1
            if chunk.ssd is None:
                return
            try:  # only if the file is still the one that was read (a rewrite may have replaced it)
                same = os.stat(chunk.ssd.path).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = True
            if same:
                index.drop_ssd_locked(chunk)
                if chunk.dram is None:
                    index.unregister_locked(chunk)  # not servable: a new copy may take its digest
                index.repair_owners_locked(chunk)
