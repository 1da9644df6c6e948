"""On-disk list of the content chunks a session starts with, so a restart rebuilds what sessions share.

A session's own chunks are files named by its key's hash and their index; the content chunks it shares
are files named by their digest, held once whatever the number of sessions. The manifest names those
digests in order (the session's first chunks), beside its own files::

    magic (8 bytes) | u32 body length | u32 crc32 of body | body (JSON: session_key, created, refs)

Written like a chunk (temporary name, fsync, rename). The start-up scan trusts nothing in it: each digest
must name a content chunk file that continues the chain (parent, position) and a manifest that fails its
checks is deleted.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
import zlib
from pathlib import Path

from strata.storage.chunk_file import TEMP_MARK, ChunkError

MAGIC = b"STRATAMF"
SUFFIX = ".kvs"
MAX_BYTES = 1 << 20
MAX_REFS = 4096
_PREFIX = struct.Struct("<8sII")


def manifest_path(directory: Path, stem: str) -> Path:
    return directory / f"{stem}{SUFFIX}"


def encode(session_key: str, created: float, refs: list[str]) -> bytes:
    body = json.dumps({"session_key": session_key, "created": created, "refs": refs},
                      separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, len(body), zlib.crc32(body)) + body


def decode(data: bytes) -> tuple[str, float, list[str]]:
    """(session key, created, refs); ChunkError when anything is off."""
    if len(data) < _PREFIX.size or len(data) > MAX_BYTES:
        raise ChunkError("format", "manifest size")
    magic, length, crc = _PREFIX.unpack(data[:_PREFIX.size])
    body = data[_PREFIX.size:]
    if magic != MAGIC or length != len(body):
        raise ChunkError("format", "manifest header")
    if zlib.crc32(body) != crc:
        raise ChunkError("checksum", "manifest")
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ChunkError("format", str(e)) from e
    key, created, refs = (doc.get(k) for k in ("session_key", "created", "refs")) if type(doc) is dict else (
        None, None, None)
    if (type(key) is not str or not key or type(created) not in (int, float) or type(refs) is not list
            or len(refs) > MAX_REFS or not all(type(r) is str and len(r) == 64 for r in refs)):
        raise ChunkError("format", "manifest fields")
    return key, float(created), refs


def write(path: Path, session_key: str, created: float, refs: list[str]) -> None:
    """Atomically (re)place the manifest."""
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, encode(session_key, created, refs))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read(path: Path) -> tuple[str, float, list[str]]:
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    return decode(data)
