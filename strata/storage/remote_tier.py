"""The shared KV tier (--remote-kv): chunk files that several servers can reach, so a session that moves to
another server (scale-out, a killed node) keeps its KV.

What goes there is exactly what the SSD tier wrote (the chunk file: header with session key, token ids,
prefix hash and model fingerprint, then each layer with its CRC), sealed with an HMAC that binds it to its
key (:mod:`.chunk_signing`), uploaded after the local write on a thread of its own, so the forward pass
never waits on it. Keys are the model fingerprint and either the session's file stem (a hash of the
tenant-scoped session key: tenants stay apart) and the chunk index, for a session's own chunks, or
``c:DIGEST`` for a content chunk that sessions of a tenant share (:mod:`.content_chain`; the tenant is in
the digest), stored once whatever the number of sessions holding it.

Trust: the store is reached with a password or ACL user (never in the URL: from a file or the
environment) and over TLS with ``rediss://``; whatever it returns is still treated as hostile. A session
unknown to a server is imported one chunk at a time (memory holds one chunk; a value larger than any chunk
of this layout is refused unread): each chunk's signature is checked, then the whole chunk as the start-up
scan checks local files (header field types, fingerprint, every layer's CRC) and its place in the chain
(index, start, prefix hash, session key; for a content chunk its digest and parent), all in memory, and only
then is SSD space reserved and the file written. Import takes the content chunks the prompt starts with
(those this server holds, else the remote's), then the session's own chunks after them, and stops at the
prompt: a session costs at most the prompt's tokens plus one chunk.

Deletion sticks: ``forget`` leaves a tombstone (the deletion's wall time, kept for the TTL) and deletes
the session's own chunks and the content chunks no other session on this server holds (others expire).
Every stored value carries, under its signature, when its session was created; a copy created
before the tombstone is never imported, never uploaded again, and dropped by a server holding it when the
session is next asked for, while a session started afresh under the same id after the deletion is shared
as usual. A forget that finds the remote down is retried when it is back. (Servers compare wall clocks:
a session re-created within the clock skew of its deletion may be refused once, which costs only reuse.)

TTL: a session's keys get their expiry pushed back when it
is used (at most every quarter TTL), so long conversations do not lose their shared copy first.

The remote is an optimisation, never a dependency: every call has a short timeout, an error marks the
remote down for a while (no call at all meanwhile), uploads that do not fit the queue are dropped, and a
session that cannot be imported is recomputed. Redis is the first backend; another store implements
:class:`RemoteBackend`.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol
from urllib.parse import urlsplit

from strata.storage.chunk_file import (
    MAX_HEADER_BYTES,
    TEMP_MARK,
    ChunkError,
    ChunkHeader,
    commit,
    fsync_dir,
    prefix_hash,
    validate_bytes,
)
from strata.storage.chunk_signing import ChunkSigner
from strata.storage.content_chain import prompt_digests, scope_of
from strata.storage.injected_delays import NO_DELAYS, InjectedDelays
from strata.storage.job_thread import JobThread
from strata.storage.session_entry import Chunk, SessionEntry, SsdCopy, common_prefix
from strata.storage.session_index import SessionIndex, unlink
from strata.storage.ssd_scan import chunk_path, content_path, file_stem

if TYPE_CHECKING:
    from strata.storage.ssd_tier import SsdTier

log = logging.getLogger(__name__)

MAX_CHUNKS = 256  # chunks fetched per session (with 256-token chunks: 64k tokens)
DOWN_FOR_S = 10.0  # after an error, the remote is left alone this long
MAX_UNFORGOTTEN = 100_000  # deletions kept for a retry while the remote is down
_CREATED = struct.Struct("<d")  # before the chunk, under the signature: when its session was created


class RemoteBackend(Protocol):
    def get_capped(self, key: str, max_bytes: int) -> tuple[int, bytes]:
        """(the value's size, its first `max_bytes` bytes at most); size 0: no such key."""
        ...

    def put(self, key: str, value: bytes, ttl_s: float) -> None: ...
    def delete_many(self, keys: list[str]) -> None: ...
    def expire_many(self, keys: list[str], ttl_s: float) -> None: ...


class RedisBackend:
    def __init__(self, url: str, timeout_s: float, *, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None) -> None:
        import redis

        tls = {"ssl_ca_certs": ca_file, "ssl_cert_reqs": "required"} if url.startswith("rediss://") else {}
        credentials = {k: v for k, v in (("username", username), ("password", password)) if v}
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False, health_check_interval=0, **credentials, **tls)

    def get_capped(self, key: str, max_bytes: int) -> tuple[int, bytes]:
        # The size first: an oversized value never crosses the network; GETRANGE keeps the read capped
        # should the value grow in between.
        size = int(self._redis.strlen(key))
        if size == 0 or size > max_bytes:
            return size, b""
        return size, bytes(self._redis.getrange(key, 0, max_bytes - 1))

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._redis.set(key, value, ex=max(1, int(ttl_s)))

    def delete_many(self, keys: list[str]) -> None:
        self._redis.delete(*keys)

    def expire_many(self, keys: list[str], ttl_s: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.expire(key, max(1, int(ttl_s)))
        pipe.execute()


def open_backend(url: str, timeout_s: float, *, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None) -> RemoteBackend:
    """The store behind ``url``. A password inside the URL is refused: URLs end up in argv, process
    listings and logs; it comes from a file or the environment instead."""
    if urlsplit(url).password:
        raise ValueError("--remote-kv: the URL must not hold a password (give it in a file or the environment)")
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBackend(url, timeout_s, username=username, password=password, ca_file=ca_file)
    raise ValueError(f"--remote-kv: no backend for {url!r} (redis://HOST:PORT/DB or rediss:// is supported)")


@dataclass
class _Staged:
    """A fetched chunk, verified and written to a temporary file, its SSD space reserved."""

    tmp: Path
    final: Path
    header: ChunkHeader
    size: int
    created: float
    committed: bool = False


class RemoteImport(NamedTuple):
    tokens: int  # imported into the SSD tier (0: nothing usable, or held here already)
    deleted_elsewhere: bool = False  # a tombstone outdates what this server holds: its copies must go


class RemoteTier:
    def __init__(self, backend: RemoteBackend, signer: ChunkSigner, index: SessionIndex, fingerprint: str,
                 ttl_s: float, queue_limit: int = 1024, delays: InjectedDelays = NO_DELAYS) -> None:
        self.backend = backend
        self.delays = delays
        self.signer = signer
        self.index = index
        self.fingerprint = fingerprint
        self.ttl_s = ttl_s
        self.queue_limit = queue_limit
        self._queued = 0
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._unforgotten: dict[str, float] = {}  # stem -> deletion time: forgets the remote missed
        self.uploader = JobThread("kv-remote", lambda: index.count("remote_errors"), idle=self._retry_forgets)

    def key(self, name: str) -> str:
        """The store key of a chunk: ``STEM:INDEX`` (a session's own) or ``c:DIGEST`` (a content chunk)."""
        return f"strata:{self.fingerprint}:{name}"

    @staticmethod
    def chunk_name(entry: SessionEntry, chunk: Chunk) -> str:
        return f"c:{chunk.digest}" if chunk.digest else f"{entry.file_stem}:{chunk.index:06d}"

    def tombstone_key(self, stem: str) -> str:
        return f"strata:{self.fingerprint}:{stem}:deleted"

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, e: Exception) -> None:
        self._down_until = time.monotonic() + DOWN_FOR_S
        self.index.count("remote_errors")
        log.warning("remote KV tier %s failed (%s); not used for %.0f s", what, e, DOWN_FOR_S)

    # ------------------------------------------------------------------ upload (after the SSD write)

    def upload(self, path: Path, name: str, created: float) -> None:
        """Queue a chunk file for upload under ``name`` (see ``key``); dropped (and counted) when the queue is
        full or the remote down. ``created``: its session's creation (0 for a content chunk)."""
        with self._lock:
            if self._queued >= self.queue_limit or not self.available:
                self.index.count("remote_uploads_dropped")
                return
            self._queued += 1
        self.uploader.put(lambda: self._upload(path, name, created))

    def _upload(self, path: Path, name: str, created: float) -> None:
        with self._lock:
            self._queued -= 1
        if not self.available:
            self.index.count("remote_uploads_dropped")
            return
        try:
            data = path.read_bytes()
        except OSError:  # replaced or evicted meanwhile: a later write uploads the new one
            return
        key = self.key(name)
        try:
            # A session's own chunk older than a deletion elsewhere is not shared again; a content chunk
            # belongs to no session.
            deleted_at = None if name.startswith("c:") else self._deleted_at(name.partition(":")[0])
            if deleted_at is not None and created <= deleted_at:
                self.index.count("remote_uploads_dropped_deleted")
                return
            self.backend.put(key, self.signer.seal(key, _CREATED.pack(created) + data), self.ttl_s)
        except Exception as e:
            self._failed("upload", e)
            return
        self.index.count("remote_uploads")
        self.index.count("bytes_saved_remote", len(data))

    def pending(self) -> int:
        with self._lock:
            return self._queued

    # ------------------------------------------------------------------ download (a local miss)

    def close(self, timeout: float | None) -> None:
        self.uploader.stop(timeout)

    def _deleted_at(self, stem: str) -> float | None:
        """When the session was deleted (its tombstone), None if it was not. Raises what the backend raises."""
        size, value = self.backend.get_capped(self.tombstone_key(stem), 32)
        if size == 0:
            return None
        try:
            return float(value)
        except ValueError:
            return float("inf")  # unreadable: treated as deleted now, which costs only reuse

    def import_session(self, ssd: SsdTier, key: str, prompt_ids: list[int]) -> RemoteImport:
        """Bring a session this server does not hold from the remote into its SSD tier.

        What this server holds of a session is dropped when created before its deletion elsewhere (its
        tombstone; ``deleted_elsewhere``: the engine then drops its device copy too); what it holds otherwise
        gets its shared copy's expiry pushed back. Chunks created before the tombstone are never imported.

        Each fetched chunk is verified (signature, then as a local file at start-up: fingerprint, header,
        every layer's CRC), must continue the chain (index, start, prefix hash) and belong to this session,
        all before anything is written; the SSD space is reserved before each
        write. The entry comes in marked ``from_remote``: its first hit reports tier "remote".
        """
        index = self.index
        if ssd.dir is None or not self.available:
            return RemoteImport(0)
        stem = file_stem(key)
        try:
            deleted_at = self._deleted_at(stem)
        except Exception as e:
            self._failed("tombstone read", e)
            return RemoteImport(0)
        with index.lock:
            held = index.entries.get(key)
            if held is not None and deleted_at is not None and held.created <= deleted_at:
                index.delete_locked(key)
                index.counters["remote_deletions_applied"] += 1
                return RemoteImport(0, deleted_elsewhere=True)
            if held is not None:
                self._touch_locked(held)
                return RemoteImport(0)
        # Not in this store; a device copy from before a deletion must go even if nothing newer comes in.
        deleted_elsewhere = deleted_at is not None
        imported = self._import(ssd, key, stem, prompt_ids, deleted_at)
        return RemoteImport(imported, deleted_elsewhere)

    def _import(self, ssd: SsdTier, key: str, stem: str, prompt_ids: list[int], deleted_at: float | None) -> int:
        """The content chunks the prompt starts with (this server's, else the shared tier's), then the
        session's own chunks that follow them; each verified and staged in a temporary file (space reserved)
        before anything becomes visible. Nothing is imported when this server already holds all of it."""
        assert ssd.dir is not None
        index = self.index
        max_chunk_bytes = (self.signer.overhead + _CREATED.size + MAX_HEADER_BYTES
                           + ssd.layout.num_layers * ssd.layout.layer_bytes(ssd.chunk_tokens))
        # In order, with their tokens: content chunks held here, or chunks staged from the remote.
        parts: list[tuple[Chunk | _Staged, list[int]]] = []
        tokens: list[int] = []
        created: float | None = None
        try:
            scope = scope_of(key)
            digests = prompt_digests(scope, prompt_ids[:-1], ssd.chunk_tokens, MAX_CHUNKS) if scope else []
            for i, digest in enumerate(digests):
                with index.lock:
                    local = index.content.get(digest)
                    local = local if local is not None and local.servable else None
                if local is None:
                    store_key = self.key(f"c:{digest}")
                    blob = next(self._fetch([store_key], max_chunk_bytes), None)
                    if blob is None:
                        break
                    staged = self._stage(ssd, blob, tokens, i, digest=digest, parent=digests[i - 1] if i else "")
                    if staged is None:
                        break
                    parts.append((staged, staged.header.token_ids))
                else:
                    parts.append((local, prompt_ids[i * ssd.chunk_tokens:(i + 1) * ssd.chunk_tokens]))
                tokens = tokens + parts[-1][1]
            first_own = len(parts)
            own_keys = [self.key(f"{stem}:{i:06d}") for i in range(first_own, MAX_CHUNKS)]
            for i, blob in enumerate(self._fetch(own_keys, max_chunk_bytes), start=first_own):
                staged = self._stage(ssd, blob, tokens, i, session_key=key, deleted_at=deleted_at)
                if staged is None:
                    break
                created = staged.created if created is None else created
                parts.append((staged, staged.header.token_ids))
                tokens = tokens + staged.header.token_ids
                if common_prefix(tokens, prompt_ids) < len(tokens):
                    break  # the prompt left this session's history (or ends here): the rest is of no use
            if not any(isinstance(p, _Staged) for p, _ in parts):
                return 0  # all of it is here already: the preparer's adoption takes it
            entry = self._commit(ssd, key, stem, parts, created)
            fsync_dir(ssd.dir)
            return len(entry.tokens) if entry is not None else 0
        except OSError as e:
            log.warning("importing session KV from the remote tier failed: %s", e)
            index.count("remote_errors")
            return 0
        finally:
            leftover = [p for p, _ in parts if isinstance(p, _Staged) and not p.committed]
            with index.lock:
                index.ssd_reserved -= sum(p.size for p in leftover)
            for p in leftover:
                unlink(p.tmp)

    def _fetch(self, store_keys: list[str], max_chunk_bytes: int) -> Iterator[tuple[str, bytes]]:
        """The sealed values under ``store_keys`` in order, one at a time (memory holds one chunk), up to the
        first missing one; a value over ``max_chunk_bytes`` (no sealed chunk of this layout is that large)
        ends it too. Nothing when the remote is down or failing."""
        for store_key in store_keys:
            if not self.available:
                self.index.count("remote_skipped_down")
                return
            self.delays.before_remote_read()
            try:
                size, blob = self.backend.get_capped(store_key, max_chunk_bytes)
            except Exception as e:
                self._failed("fetch", e)
                return
            if size == 0:
                return
            if size > max_chunk_bytes:
                self.index.count("remote_chunks_discarded_oversize")
                return
            self.index.count("remote_chunks_fetched")
            yield store_key, blob

    def _stage(self, ssd: SsdTier, fetched: tuple[str, bytes], tokens: list[int], index_in_session: int, *,
               session_key: str = "", digest: str = "", parent: str = "",
               deleted_at: float | None = None) -> _Staged | None:
        """Verify one fetched chunk (signature, then as a local file: header, fingerprint, every layer's CRC,
        then its place: this session's, or the content chunk with this digest, continuing ``tokens``) and
        write it to a temporary file with its SSD space reserved; None (counted) when it does not pass."""
        assert ssd.dir is not None
        index = self.index
        store_key, blob = fetched
        try:
            sealed = self.signer.open(store_key, blob)
            created, chunk = _CREATED.unpack(sealed[:_CREATED.size])[0], sealed[_CREATED.size:]
            if session_key and deleted_at is not None and created <= deleted_at:
                raise ChunkError("deleted", f"session created at {created}, deleted at {deleted_at}")
            header = validate_bytes(chunk, ssd.layout)
        except (ChunkError, struct.error) as e:
            index.count(f"remote_chunks_discarded_{getattr(e, 'reason', 'format')}")
            return None
        if (header.session_key != session_key or header.digest != digest or header.parent != parent
                or header.chunk_index != index_in_session or header.start != len(tokens)
                or header.prefix_hash != prefix_hash(tokens + header.token_ids)):
            index.count("remote_chunks_discarded_stale")
            return None
        with index.lock:
            if not ssd.reserve_locked(len(chunk), None):
                return None
        final = content_path(ssd.dir, digest) if digest else chunk_path(ssd.dir, file_stem(session_key),
                                                                        index_in_session)
        tmp = final.with_name(f"{final.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
        staged = _Staged(tmp, final, header, len(chunk), created)
        _write_synced(tmp, chunk)
        return staged

    def _commit(self, ssd: SsdTier, key: str, stem: str, parts: list[tuple[Chunk | _Staged, list[int]]],
                created: float | None) -> SessionEntry | None:
        """Make the verified parts the session's entry, all at once under the lock (None: it appeared here
        meanwhile). Content chunks registered meanwhile by another session are taken instead of the copy."""
        index = self.index
        entry = SessionEntry(key=key, file_stem=stem)
        if created is not None:
            entry.created = created  # the session's own creation, wherever that was
        with index.lock:
            if key in index.entries:
                return None
            for part, part_tokens in parts:
                if isinstance(part, Chunk):
                    chunk = part if part.servable and index.content.get(part.digest or "") is part else None
                    if chunk is None:
                        break
                else:
                    digest = part.header.digest or None
                    chunk = index.content.get(digest) if digest is not None else None
                    if chunk is None or not chunk.servable:
                        commit(part.tmp, part.final)
                        n = part.header.num_tokens
                        held = part.header.held_layers
                        chunk = Chunk(index=part.header.chunk_index, start=part.header.start, n=n,
                                      held_layers=held, ssd=SsdCopy(path=part.final, nbytes=part.size,
                                                                    file_tokens=n, valid_tokens=n, held_layers=held))
                        index.ssd_used += part.size
                        if digest is not None:
                            index.register_locked(chunk, digest, part.header.parent, part.header.scope,
                                                  part.header.token_ids)
                        elif entry.private_from is None:
                            entry.private_from = chunk.start
                        index.counters["tokens_imported_remote"] += n
                    else:
                        unlink(part.tmp)
                    index.ssd_reserved -= part.size
                    part.committed = True
                chunk.owners.add(key)
                entry.chunks.append(chunk)
                entry.tokens.extend(part_tokens)
            entry.last_used = time.time()
            entry.from_remote = True
            entry.remote_touched = time.monotonic()
            index.entries[key] = entry
            index.counters["remote_imports"] += 1
        return entry

    # ------------------------------------------------------------------ expiry and deletion

    def _touch_locked(self, entry: SessionEntry) -> None:
        """The session is in use: push back its shared copy's expiry (at most every quarter TTL)."""
        now = time.monotonic()
        if now - entry.remote_touched < self.ttl_s / 4 or not entry.chunks:
            return
        entry.remote_touched = now
        keys = [self.key(self.chunk_name(entry, c)) for c in entry.chunks]

        def expire() -> None:
            if not self.available:
                return
            try:
                self.backend.expire_many(keys, self.ttl_s)
            except Exception as e:
                self._failed("expire", e)

        self.uploader.put(expire)

    def forget(self, session_key: str, orphaned: tuple[str, ...] | list[str] = ()) -> None:
        """A deleted session leaves the shared tier too (queued behind its uploads): a tombstone first, so
        servers holding a copy drop it, then its own chunks and the content chunks no session here shares
        (``orphaned`` digests; one another server's session still uses is uploaded again when it next
        writes it, or recomputed there). Retried while the remote is down."""
        stem = file_stem(session_key)
        deleted_at = time.time()
        names = [f"c:{d}" for d in orphaned]
        self.uploader.put(lambda: self._forget(stem, deleted_at, names))

    def _forget(self, stem: str, deleted_at: float, names: list[str] | None = None) -> bool:
        if self.available:
            try:
                self.backend.put(self.tombstone_key(stem), repr(deleted_at).encode(), self.ttl_s)
                own = [self.key(f"{stem}:{i:06d}") for i in range(MAX_CHUNKS)]
                self.backend.delete_many(own + [self.key(n) for n in names or []])
                with self._lock:
                    self._unforgotten.pop(stem, None)
                return True
            except Exception as e:
                self._failed("delete", e)
        with self._lock:
            if stem in self._unforgotten or len(self._unforgotten) < MAX_UNFORGOTTEN:
                self._unforgotten[stem] = deleted_at
            else:
                self.index.count("remote_forgets_dropped")
        return False

    def _retry_forgets(self) -> None:
        """Idle uploader: deletions the remote missed while it was down, now that it may be back."""
        with self._lock:
            missed = list(self._unforgotten.items())
        for stem, deleted_at in missed:
            if not self.available or not self._forget(stem, deleted_at):
                return


def _write_synced(path: Path, data: bytes | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        os.fsync(fd)
    finally:
        os.close(fd)
