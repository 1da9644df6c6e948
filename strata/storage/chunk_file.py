"""On-disk format of one SSD chunk: a checked header, then layer-major K/V.

Layout::

    magic (8 bytes) | u32 header length | u32 crc32 of header | header (JSON) | payload

The payload holds, for each layer in order, K then V of the chunk's tokens, each
``[tokens, kv_heads, head_dim]`` in the model dtype. Layer ``l`` starts at
``payload_offset + l * layer_bytes`` so one layer can be read (and checked, each
layer has its own crc32) without reading the rest. A chunk that no later token reads at
some sliding-window layers leaves them out: the header's ``layers`` lists those it holds,
in payload order (empty: every layer). Rows are stored as ``format`` says (kv_codec.py: the model
dtype, or quantized rows packed into bytes); the checksums cover the stored bytes.

Files are written under a temporary name, fsynced, then renamed by the caller;
a crash leaves either the old file, the new file, or a temporary file that the
directory scan removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from strata.storage.content_chain import content_digest
from strata.storage.kv_codec import KVCodec

MAGIC = b"STRATAKV"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # a header lists its tokens: 1 MiB holds far more than any chunk
SUFFIX = ".kvc"
TEMP_MARK = ".tmp"
_PREFIX = struct.Struct("<8sII")


class ChunkError(Exception):
    """A chunk file that must not be served; ``reason`` says why (for counters)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ChunkLayout:
    """What every chunk of this store must agree with."""

    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the model's
    format: str = "model"  # how rows are stored (kv_codec.py): "model" is the model dtype itself

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @cached_property
    def codec(self) -> KVCodec:
        return KVCodec(self.format, self.dtype, self.head_dim)

    @property
    def header_format(self) -> str:
        """The header's ``format`` field: empty for the model dtype (as files before formats existed)."""
        return "" if self.format == "model" else self.format

    def layer_bytes(self, tokens: int) -> int:
        return 2 * tokens * self.num_kv_heads * self.codec.row_bytes

    def rows(self, raw: bytes | bytearray, tokens: int) -> torch.Tensor:
        """One layer's payload as stored rows: [2, tokens, kv_heads, width]."""
        codec = self.codec
        flat = torch.frombuffer(raw if isinstance(raw, bytearray) else bytearray(raw), dtype=torch.uint8)
        return flat.view(codec.storage_dtype).view(2, tokens, self.num_kv_heads, codec.width)


@dataclass(frozen=True)
class ChunkHeader:
    fingerprint: str
    session_key: str
    chunk_index: int
    start: int
    token_ids: list[int]
    prefix_hash: str  # hash of the session's tokens [0, end): chunks of one history chain together
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layer_crc: list[int]
    version: int = FORMAT_VERSION
    # A content chunk (shared by the sessions of a tenant, see content_chain): its address, its parent's
    # and the tenant scope; session_key is then empty. All empty for a session's own chunk.
    digest: str = ""
    parent: str = ""
    scope: str = ""
    layers: list[int] = field(default_factory=list)  # the layers in the payload, in order (empty: all)
    format: str = ""  # how its rows are stored (kv_codec.py; empty: the model dtype)

    @property
    def held(self) -> list[int]:
        """The model layers whose K/V the payload holds, in payload order."""
        return self.layers or list(range(self.num_layers))

    @property
    def held_layers(self) -> tuple[int, ...] | None:
        """As a Chunk says it: None for every layer."""
        return tuple(self.layers) if self.layers else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), separators=(",", ":")).encode()
        return _PREFIX.pack(MAGIC, len(body), zlib.crc32(body)) + body


def prefix_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(token_ids, dtype=np.int64).tobytes()).hexdigest()


def layer_payloads(kv: torch.Tensor) -> list[bytes]:
    """kv: [held layers, 2, tokens, kv_heads, head_dim] -> one contiguous byte string per layer."""
    return [kv[layer].contiguous().view(torch.uint8).numpy().tobytes() for layer in range(kv.shape[0])]


def write_temp(tmp_path: Path, header_without_crc: ChunkHeader, kv: torch.Tensor) -> int:
    """Write header + payload to ``tmp_path`` and fsync it; returns the file size."""
    layers = layer_payloads(kv)
    header = ChunkHeader(**{**asdict(header_without_crc), "layer_crc": [zlib.crc32(b) for b in layers]})
    head = header.encode()
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(head)
            for b in layers:
                f.write(b)
            f.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(head) + sum(len(b) for b in layers)


def commit(tmp_path: Path, final_path: Path) -> None:
    """Atomically publish a fsynced temporary file (rename), then persist the directory entry."""
    os.replace(tmp_path, final_path)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_int(v: object, low: int, high: int) -> bool:
    return type(v) is int and low <= v < high  # bool is no int here


def _wrongly_typed(h: ChunkHeader) -> str | None:
    """The first header field whose JSON value is not of its declared type and range (a file or a remote
    store may hold anything that passes the header CRC), or None."""
    for name in ("fingerprint", "session_key", "prefix_hash", "dtype", "digest", "parent", "scope", "format"):
        if type(getattr(h, name)) is not str:
            return name
    for name in ("chunk_index", "start", "num_layers", "num_kv_heads", "head_dim", "version"):
        if not _is_int(getattr(h, name), 0, 2**31):
            return name
    if type(h.token_ids) is not list or not all(_is_int(t, 0, 2**31) for t in h.token_ids):
        return "token_ids"
    if type(h.layer_crc) is not list or not all(_is_int(c, 0, 2**32) for c in h.layer_crc):
        return "layer_crc"
    if (type(h.layers) is not list or not all(_is_int(v, 0, h.num_layers) for v in h.layers)
            or h.layers != sorted(set(h.layers))):
        return "layers"
    return None


def read_header(fd: int, layout: ChunkLayout, file_size: int) -> tuple[ChunkHeader, int]:
    """Parse and check the header of an open chunk file; returns it and the payload offset."""
    return parse_header(lambda size, offset: os.pread(fd, size, offset), layout, file_size)


def parse_header(read: Callable[[int, int], bytes], layout: ChunkLayout, total_size: int) -> tuple[ChunkHeader, int]:
    """Parse and check a chunk's header through ``read(size, offset)`` (a file or bytes in memory); returns
    it and the payload offset. ``total_size``: the whole chunk's bytes, checked against the header."""
    raw = read(_PREFIX.size, 0)
    if len(raw) < _PREFIX.size:
        raise ChunkError("truncated", "no header")
    magic, length, crc = _PREFIX.unpack(raw)
    if magic != MAGIC:
        raise ChunkError("format", "bad magic")
    if length > MAX_HEADER_BYTES:
        raise ChunkError("format", f"header of {length} bytes")
    body = read(length, _PREFIX.size)
    if len(body) < length:
        raise ChunkError("truncated", "short header")
    if zlib.crc32(body) != crc:
        raise ChunkError("checksum", "header")
    try:
        header = ChunkHeader(**json.loads(body))
    except (ValueError, TypeError) as e:
        raise ChunkError("format", str(e)) from e
    if wrong := _wrongly_typed(header):
        raise ChunkError("format", f"field {wrong}")
    if header.version != FORMAT_VERSION:
        raise ChunkError("format", f"version {header.version}")
    if header.fingerprint != layout.fingerprint:
        raise ChunkError("fingerprint", header.fingerprint)
    shape = (header.num_layers, header.num_kv_heads, header.head_dim, header.dtype)
    if shape != (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype_name):
        raise ChunkError("fingerprint", f"shape {shape}")
    if header.format != layout.header_format:  # stored in another --kv-tier-dtype
        raise ChunkError("fingerprint", f"format {header.format or 'model'}")
    if header.num_tokens < 1 or not header.held or len(header.layer_crc) != len(header.held):
        raise ChunkError("format", "empty chunk")
    if header.digest and (header.session_key or not header.scope
                          or header.digest != content_digest(header.scope, header.parent, header.token_ids)):
        raise ChunkError("format", "content digest")
    if not header.digest and not header.session_key:
        raise ChunkError("format", "neither a session's nor a content chunk")
    offset = _PREFIX.size + length
    if total_size != offset + len(header.held) * layout.layer_bytes(header.num_tokens):
        raise ChunkError("truncated", f"size {total_size}")
    return header, offset


def read_layer(fd: int, header: ChunkHeader, offset: int, layout: ChunkLayout, layer: int) -> torch.Tensor:
    """One layer of a chunk (one it holds), checked against its crc, as stored: [2, tokens, kv_heads, width]."""
    row = header.held.index(layer)
    size = layout.layer_bytes(header.num_tokens)
    raw = os.pread(fd, size, offset + row * size)
    if len(raw) != size:
        raise ChunkError("truncated", f"layer {layer}")
    if zlib.crc32(raw) != header.layer_crc[row]:
        raise ChunkError("checksum", f"layer {layer}")
    return layout.rows(raw, header.num_tokens)


def validate_bytes(chunk: bytes, layout: ChunkLayout) -> ChunkHeader:
    """Full check of a chunk held in memory (header and every layer's checksum), before it is written."""
    view = memoryview(chunk)
    header, offset = parse_header(lambda size, at: bytes(view[at:at + size]), layout, len(chunk))
    size = layout.layer_bytes(header.num_tokens)
    for row in range(len(header.held)):
        start = offset + row * size
        if zlib.crc32(view[start:start + size]) != header.layer_crc[row]:
            raise ChunkError("checksum", f"layer {header.held[row]}")
    return header


def validate_file(path: Path, layout: ChunkLayout) -> ChunkHeader:
    """Full check of a chunk file (header and every layer's checksum)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        header, offset = read_header(fd, layout, os.fstat(fd).st_size)
        for layer in header.held:
            read_layer(fd, header, offset, layout, layer)
        return header
    finally:
        os.close(fd)
