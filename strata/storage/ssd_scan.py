"""Rebuild the session index from the chunk files and manifests of an SSD directory (after a restart or crash).

Only headers are read here, so start-up time grows with the number of files, not their bytes. A header
fixes the file's exact size, so a truncated file is caught here too; a payload corrupted on disk is caught
by its layer's CRC when it is first read to be served (kv_loader, SsdTier.read_chunk), and discarded then.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from strata.storage import session_manifest
from strata.storage.chunk_file import (
    SUFFIX,
    TEMP_MARK,
    ChunkError,
    ChunkHeader,
    ChunkLayout,
    prefix_hash,
    read_header,
)
from strata.storage.content_chain import scope_of
from strata.storage.session_entry import Chunk, SessionEntry, SsdCopy


def file_stem(session_key: str) -> str:
    """Session keys are opaque (tenant-scoped, any characters): only their hash names files."""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


def chunk_path(directory: Path, stem: str, index: int) -> Path:
    """A session's own chunk."""
    return directory / f"{stem}-{index:06d}{SUFFIX}"


def content_path(directory: Path, digest: str) -> Path:
    """A content chunk, held once for every session that shares it."""
    return directory / f"c-{digest}{SUFFIX}"


@dataclass
class ScanResult:
    entries: dict[str, SessionEntry] = field(default_factory=dict)
    content: dict[str, Chunk] = field(default_factory=dict)  # digest -> chunk, each referenced by a session
    discarded: Counter[str] = field(default_factory=Counter)  # reason -> chunk files deleted
    temp_removed: int = 0
    ssd_bytes: int = 0  # chunk files kept, each counted once


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _check_header(path: Path, layout: ChunkLayout) -> ChunkHeader:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_header(fd, layout, os.fstat(fd).st_size)[0]
    finally:
        os.close(fd)


@dataclass
class _File:
    header: ChunkHeader
    path: Path
    size: int
    mtime: float


def scan_directory(directory: Path, layout: ChunkLayout) -> ScanResult:
    """Check every chunk's header (its checksum, fingerprint, the file's size) and every manifest; delete
    what must not be served. The payload's per-layer checksums wait for the first read.

    A session is the content chunks its manifest lists, then its own chunks; they must chain: consecutive
    token ranges whose prefix hash matches the concatenated ids, content chunks linked by their parents.
    The chain stops at the first gap; later chunks are stale. Content chunks no session lists are removed.
    """
    result = ScanResult()
    own: dict[str, list[_File]] = {}
    content_files: dict[str, _File] = {}
    manifests: dict[str, tuple[Path, float, list[str]]] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        if TEMP_MARK in path.name:  # an interrupted write: never renamed, never valid
            _remove(path)
            result.temp_removed += 1
            continue
        try:
            if path.name.endswith(session_manifest.SUFFIX):
                key, created, refs = session_manifest.read(path)
                if path != session_manifest.manifest_path(directory, file_stem(key)):
                    raise ChunkError("format", "manifest name does not match its key")
                manifests[key] = (path, created, refs)
                continue
            if not path.name.endswith(SUFFIX):
                continue
            header = _check_header(path, layout)
            expected = (content_path(directory, header.digest) if header.digest
                        else chunk_path(directory, file_stem(header.session_key), header.chunk_index))
            if path != expected:
                raise ChunkError("format", "file name does not match header")
        except ChunkError as e:
            result.discarded[e.reason] += 1
            _remove(path)
            continue
        except OSError:
            result.discarded["io"] += 1
            _remove(path)
            continue
        st = path.stat()
        file = _File(header, path, st.st_size, st.st_mtime)
        if header.digest:
            content_files[header.digest] = file
        else:
            own.setdefault(header.session_key, []).append(file)

    for key in sorted(set(own) | set(manifests)):
        entry = SessionEntry(key=key, file_stem=file_stem(key))
        manifest = manifests.get(key)
        if manifest is not None:
            entry.manifest, entry.created = manifest[0], manifest[1]
            _adopt_content(entry, manifest[2], content_files, result)
            entry.refs_written = entry.content_refs()
        files = sorted(own.get(key, []), key=lambda f: f.header.chunk_index)
        for i, file in enumerate(files):
            header = file.header
            tokens = entry.tokens + header.token_ids
            if header.chunk_index < len(entry.chunks):  # superseded by a content chunk
                result.discarded["stale"] += 1
                _remove(file.path)
                continue
            if header.chunk_index != len(entry.chunks) or header.start != len(entry.tokens) \
                    or header.prefix_hash != prefix_hash(tokens):
                for stale in files[i:]:
                    result.discarded["stale"] += 1
                    _remove(stale.path)
                break
            n = header.num_tokens
            if entry.private_from is None:  # how its own KV was computed is not known: it is never shared
                entry.private_from = header.start
            held = header.held_layers
            entry.chunks.append(Chunk(index=header.chunk_index, start=header.start, n=n, owners={key},
                                      held_layers=held, ssd=SsdCopy(path=file.path, nbytes=file.size,
                                                                    file_tokens=n, valid_tokens=n, held_layers=held)))
            entry.tokens = tokens
            entry.last_used = max(entry.last_used, file.mtime)
            result.ssd_bytes += file.size
        if entry.chunks:
            result.entries[key] = entry
        else:
            for chunk in entry.chunks:
                chunk.owners.discard(key)
            if entry.manifest is not None:
                _remove(entry.manifest)
    for digest, file in content_files.items():
        if digest not in result.content:  # no session lists it (its last one was deleted, or a crash)
            result.discarded["orphaned"] += 1
            _remove(file.path)
    if result.temp_removed or result.discarded:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return result


def _adopt_content(entry: SessionEntry, refs: list[str], files: dict[str, _File], result: ScanResult) -> None:
    """The session's leading content chunks, as its manifest lists them, up to the first that is missing or
    does not continue the chain."""
    scope = scope_of(entry.key)
    parent = ""
    for i, digest in enumerate(refs):
        file = files.get(digest)
        if file is None or scope is None:
            return
        header = file.header
        tokens = entry.tokens + header.token_ids
        if (header.scope != scope or header.parent != parent or header.chunk_index != i
                or header.start != len(entry.tokens) or header.prefix_hash != prefix_hash(tokens)):
            return
        chunk = result.content.get(digest)
        if chunk is None:
            n = header.num_tokens
            held = header.held_layers
            chunk = Chunk(index=i, start=header.start, n=n, digest=digest, parent=parent, scope=scope,
                          tokens=header.token_ids, held_layers=held,
                          ssd=SsdCopy(path=file.path, nbytes=file.size, file_tokens=n, valid_tokens=n,
                                      held_layers=held))
            result.content[digest] = chunk
            result.ssd_bytes += file.size
        chunk.owners.add(entry.key)
        entry.chunks.append(chunk)
        entry.tokens = tokens
        entry.last_used = max(entry.last_used, file.mtime)
        parent = digest
