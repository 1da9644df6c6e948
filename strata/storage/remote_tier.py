"""The shared KV tier (--remote-kv): chunk files that several servers can reach, so a session that moves to
another server (scale-out, a killed node) keeps its KV.

What goes there is exactly what the SSD tier wrote (the chunk file: header with session key, token ids,
prefix hash and model fingerprint, then each layer with its CRC), uploaded after the local write on a
thread of its own, so the forward pass never waits on it. Keys are the model fingerprint, the session's
file stem (a hash of the tenant-scoped session key: tenants stay apart) and the chunk index. A session
unknown to a server is imported (downloaded one chunk at a time, a value larger than any chunk of this
layout refused unread, each chunk validated as the start-up scan validates local files, header field types
included, written into the SSD tier) before its request is scheduled, and then served like an SSD hit.

The remote is an optimisation, never a dependency: every call has a short timeout, an error marks the
remote down for a while (no call at all meanwhile), uploads that do not fit the queue are dropped, and a
session that cannot be imported is recomputed. Redis is the first backend; another store implements
:class:`RemoteBackend`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from strata.storage.chunk_file import (
    MAX_HEADER_BYTES,
    TEMP_MARK,
    ChunkError,
    ChunkHeader,
    commit,
    fsync_dir,
    prefix_hash,
    validate_file,
)
from strata.storage.job_thread import JobThread
from strata.storage.session_entry import Chunk, SessionEntry, SsdCopy, common_prefix
from strata.storage.session_index import SessionIndex, unlink
from strata.storage.ssd_scan import chunk_path, file_stem

if TYPE_CHECKING:
    from strata.storage.ssd_tier import SsdTier

log = logging.getLogger(__name__)

MAX_CHUNKS = 256  # chunks fetched per session (with 256-token chunks: 64k tokens)
DOWN_FOR_S = 10.0  # after an error, the remote is left alone this long


class RemoteBackend(Protocol):
    def get_capped(self, key: str, max_bytes: int) -> tuple[int, bytes]:
        """(the value's size, its first `max_bytes` bytes at most); size 0: no such key."""
        ...

    def put(self, key: str, value: bytes, ttl_s: float) -> None: ...
    def delete_many(self, keys: list[str]) -> None: ...


class RedisBackend:
    def __init__(self, url: str, timeout_s: float) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False, health_check_interval=0)

    def get_capped(self, key: str, max_bytes: int) -> tuple[int, bytes]:
        # STRLEN and GETRANGE in one transaction: an oversized value never crosses the network.
        size, head = self._redis.pipeline(transaction=True).strlen(key).getrange(key, 0, max_bytes - 1).execute()
        return int(size), bytes(head)

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._redis.set(key, value, ex=max(1, int(ttl_s)))

    def delete_many(self, keys: list[str]) -> None:
        self._redis.delete(*keys)


def open_backend(url: str, timeout_s: float) -> RemoteBackend:
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBackend(url, timeout_s)
    raise ValueError(f"--remote-kv: no backend for {url!r} (redis://HOST:PORT/DB is supported)")


class RemoteTier:
    def __init__(self, backend: RemoteBackend, index: SessionIndex, fingerprint: str, ttl_s: float,
                 queue_limit: int = 1024) -> None:
        self.backend = backend
        self.index = index
        self.fingerprint = fingerprint
        self.ttl_s = ttl_s
        self.queue_limit = queue_limit
        self._queued = 0
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.uploader = JobThread("kv-remote", lambda: index.count("remote_errors"))

    def key(self, stem: str, chunk_index: int) -> str:
        return f"strata:{self.fingerprint}:{stem}:{chunk_index:06d}"

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, e: Exception) -> None:
        self._down_until = time.monotonic() + DOWN_FOR_S
        self.index.count("remote_errors")
        log.warning("remote KV tier %s failed (%s); not used for %.0f s", what, e, DOWN_FOR_S)

    # ------------------------------------------------------------------ upload (after the SSD write)

    def upload(self, path: Path, stem: str, chunk_index: int) -> None:
        """Queue a chunk file for upload; dropped (and counted) when the queue is full or the remote down."""
        with self._lock:
            if self._queued >= self.queue_limit or not self.available:
                self.index.count("remote_uploads_dropped")
                return
            self._queued += 1
        self.uploader.put(lambda: self._upload(path, stem, chunk_index))

    def _upload(self, path: Path, stem: str, chunk_index: int) -> None:
        with self._lock:
            self._queued -= 1
        if not self.available:
            self.index.count("remote_uploads_dropped")
            return
        try:
            data = path.read_bytes()
        except OSError:  # replaced or evicted meanwhile: a later write uploads the new one
            return
        try:
            self.backend.put(self.key(stem, chunk_index), data, self.ttl_s)
        except Exception as e:
            self._failed("upload", e)
            return
        self.index.count("remote_uploads")
        self.index.count("bytes_saved_remote", len(data))

    def pending(self) -> int:
        with self._lock:
            return self._queued

    # ------------------------------------------------------------------ download (a local miss)

    def fetch(self, stem: str, max_chunk_bytes: int) -> Iterator[bytes]:
        """The session's chunk files in order, one at a time (memory holds one chunk), up to the first
        missing one; a value over `max_chunk_bytes` (no chunk of this layout is that large) ends it too.
        Nothing when the remote is down or failing."""
        for i in range(MAX_CHUNKS):
            if not self.available:
                self.index.count("remote_skipped_down")
                return
            try:
                size, blob = self.backend.get_capped(self.key(stem, i), max_chunk_bytes)
            except Exception as e:
                self._failed("fetch", e)
                return
            if size == 0:
                return
            if size > max_chunk_bytes:
                self.index.count("remote_chunks_discarded_oversize")
                return
            yield blob

    def close(self, timeout: float | None) -> None:
        self.uploader.stop(timeout)

    def import_session(self, ssd: SsdTier, key: str, prompt_ids: list[int]) -> int:
        """Bring a session this server does not hold from the remote into its SSD tier; returns the tokens
        imported (0: nothing usable, or the session is known here already).

        Each chunk is validated like a local file at start-up (fingerprint, header, every layer's CRC),
        must continue the chain (index, start, prefix hash) and belong to this session; chunks past the
        prompt's common prefix are not fetched into the index. The entry comes in marked ``from_remote``:
        its first hit reports tier "remote".
        """
        index = self.index
        if ssd.dir is None:
            return 0
        with index.lock:
            if key in index.entries:
                return 0
        stem = file_stem(key)
        max_chunk_bytes = MAX_HEADER_BYTES + ssd.layout.num_layers * ssd.layout.layer_bytes(ssd.chunk_tokens)
        entry = SessionEntry(key=key, file_stem=stem)
        staged: list[tuple[Path, ChunkHeader | None, int]] = []  # temp files; header None: not usable
        try:
            for i, blob in enumerate(self.fetch(stem, max_chunk_bytes)):
                if i == 0:
                    self.index.count("remote_fetches")
                final = chunk_path(ssd.dir, stem, i)
                tmp = final.with_name(f"{final.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
                staged.append((tmp, None, len(blob)))
                tmp.write_bytes(blob)
                try:
                    header = validate_file(tmp, ssd.layout)
                except ChunkError as e:
                    index.count(f"remote_chunks_discarded_{e.reason}")
                    break
                tokens = entry.tokens + header.token_ids
                if header.session_key != key or header.chunk_index != i or header.start != len(entry.tokens) \
                        or header.prefix_hash != prefix_hash(tokens):
                    index.count("remote_chunks_discarded_stale")
                    break
                staged[-1] = (tmp, header, len(blob))
                entry.tokens = tokens
                if common_prefix(entry.tokens, prompt_ids) < len(entry.tokens):
                    break  # the prompt left this session's history: the rest is of no use
            usable = [(tmp, header, size) for tmp, header, size in staged if header is not None]
            if not usable:
                return 0
            total = sum(size for _, _, size in usable)
            with index.lock:
                if key in index.entries or not ssd.reserve_locked(total, None):
                    return 0
                index.ssd_reserved -= total
                for tmp, header, size in usable:
                    final = chunk_path(ssd.dir, stem, header.chunk_index)
                    commit(tmp, final)
                    n = header.num_tokens
                    entry.chunks.append(Chunk(index=header.chunk_index, start=header.start, n=n,
                                              ssd=SsdCopy(path=final, nbytes=size, file_tokens=n, valid_tokens=n)))
                staged = [s for s in staged if s[1] is None]  # the rest were renamed into place
                index.ssd_used += total
                entry.last_used = time.time()
                entry.from_remote = True
                index.entries[key] = entry
                index.counters["remote_imports"] += 1
                index.counters["tokens_imported_remote"] += len(entry.tokens)
            fsync_dir(ssd.dir)
            return len(entry.tokens)
        except OSError as e:
            log.warning("importing session KV from the remote tier failed: %s", e)
            index.count("remote_errors")
            return 0
        finally:
            for tmp, _, _ in staged:
                unlink(tmp)

    def forget(self, session_key: str) -> None:
        """A deleted session leaves the shared tier too (queued behind its uploads)."""
        stem = file_stem(session_key)

        def delete() -> None:
            if not self.available:
                return
            try:
                self.backend.delete_many([self.key(stem, i) for i in range(MAX_CHUNKS)])
            except Exception as e:
                self._failed("delete", e)

        self.uploader.put(delete)
