"""Rebuild the session index from the chunk files of an SSD directory (after a restart or crash).

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

from strata.storage.chunk_file import (
    SUFFIX,
    TEMP_MARK,
    ChunkError,
    ChunkHeader,
    ChunkLayout,
    prefix_hash,
    read_header,
)
from strata.storage.session_entry import Chunk, SessionEntry, SsdCopy


def file_stem(session_key: str) -> str:
    """Session keys are opaque (tenant-scoped, any characters): only their hash names files."""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


def chunk_path(directory: Path, stem: str, index: int) -> Path:
    return directory / f"{stem}-{index:06d}{SUFFIX}"


@dataclass
class ScanResult:
    entries: dict[str, SessionEntry] = field(default_factory=dict)
    discarded: Counter[str] = field(default_factory=Counter)  # reason -> chunk files deleted
    temp_removed: int = 0


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


def scan_directory(directory: Path, layout: ChunkLayout) -> ScanResult:
    """Check every chunk's header (its checksum, fingerprint, the file's size); delete what must not be
    served. The payload's per-layer checksums wait for the first read.

    Chunks of a session must chain: consecutive token ranges whose prefix hash matches
    the concatenated ids; the chain stops at the first gap, and later chunks are stale.
    """
    result = ScanResult()
    found: dict[str, list[tuple[ChunkHeader, Path, int, float]]] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        if TEMP_MARK in path.name:  # an interrupted write: never renamed, never valid
            _remove(path)
            result.temp_removed += 1
            continue
        if not path.name.endswith(SUFFIX):
            continue
        try:
            header = _check_header(path, layout)
            if path.name != chunk_path(directory, file_stem(header.session_key), header.chunk_index).name:
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
        found.setdefault(header.session_key, []).append((header, path, st.st_size, st.st_mtime))

    for key, files in found.items():
        files.sort(key=lambda f: f[0].chunk_index)
        entry = SessionEntry(key=key, file_stem=file_stem(key))
        for i, (header, path, size, mtime) in enumerate(files):
            tokens = entry.tokens + header.token_ids
            if header.chunk_index != i or header.start != len(entry.tokens) \
                    or header.prefix_hash != prefix_hash(tokens):
                for _, stale, _, _ in files[i:]:
                    result.discarded["stale"] += 1
                    _remove(stale)
                break
            n = header.num_tokens
            entry.chunks.append(Chunk(index=i, start=header.start, n=n,
                                      ssd=SsdCopy(path=path, nbytes=size, file_tokens=n, valid_tokens=n)))
            entry.tokens = tokens
            entry.last_used = max(entry.last_used, mtime)
        if entry.chunks:
            result.entries[key] = entry
    if result.temp_removed or result.discarded:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return result
