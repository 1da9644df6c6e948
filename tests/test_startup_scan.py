"""Start-up reads chunk headers only: the SSD tier's scan takes as long for 4 GiB of chunks as for the same
chunks (files, sessions, tokens) with almost no payload, and reads no payload. (A payload corrupted on
disk is caught when it is first read and never served: tests/test_storage_durability.py and
tests/test_sessions.py.)"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import pytest
import torch

from strata.storage.chunk_file import ChunkHeader, ChunkLayout, prefix_hash
from strata.storage.ssd_scan import chunk_path, file_stem, scan_directory

LAYOUT = ChunkLayout("fp", 30, 3, 64, torch.float32)  # the default model's KV shape, float32: 45 KiB a token
TINY = ChunkLayout("fp", 30, 1, 1, torch.float32)  # the same headers but for the shape: 240 bytes a token
GIB = 1 << 30


def _fill(directory: Path, files: int, tokens: int, layout: ChunkLayout = LAYOUT) -> int:
    """`files` valid one-chunk sessions of `tokens` tokens each; returns their bytes."""
    directory.mkdir(parents=True)
    layer = bytes(layout.layer_bytes(tokens))
    payload = layer * layout.num_layers
    crc = zlib.crc32(layer)
    total = 0
    for i in range(files):
        key, ids = f"t:s{i}", list(range(i, i + tokens))
        header = ChunkHeader(fingerprint=layout.fingerprint, session_key=key, chunk_index=0, start=0,
                             token_ids=ids, prefix_hash=prefix_hash(ids), num_layers=layout.num_layers,
                             num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                             dtype=layout.dtype_name, layer_crc=[crc] * layout.num_layers).encode()
        chunk_path(directory, file_stem(key), 0).write_bytes(header + payload)
        total += len(header) + len(payload)
    return total


def _scan_seconds(directory: Path, files: int, layout: ChunkLayout) -> float:
    """The best of three scans (each finds every session and discards nothing)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        result = scan_directory(directory, layout)
        best = min(best, time.perf_counter() - t0)
        assert len(result.entries) == files and not result.discarded
    return best


def _bytes_read_by_scan(directory: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    read = 0
    pread = os.pread

    def counting(fd: int, size: int, offset: int) -> bytes:
        nonlocal read
        data = pread(fd, size, offset)
        read += len(data)
        return data

    with monkeypatch.context() as m:
        m.setattr(os, "pread", counting)
        scan_directory(directory, LAYOUT)
    return read


def test_scan_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files, tokens = 8, 64  # 2.8 MiB a file
    total = _fill(tmp_path / "ssd", files, tokens)
    read = _bytes_read_by_scan(tmp_path / "ssd", monkeypatch)
    assert 0 < read < files * 4096 < total // 100


@pytest.mark.slow
def test_start_up_time_grows_with_files_not_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files, tokens = 2048, 46  # 2 MiB a file
    big = _fill(tmp_path / "big", files, tokens)
    small = _fill(tmp_path / "small", files, tokens, TINY)
    assert big >= 4 * GIB and small < big // 100
    assert _bytes_read_by_scan(tmp_path / "big", monkeypatch) < files * 4096
    # 4 GiB of chunks start within 2x of the time of the same chunks without their payload: only headers are
    # read (checking every layer's CRC at start-up made it about 10x).
    assert _scan_seconds(tmp_path / "big", files, LAYOUT) <= 2 * _scan_seconds(tmp_path / "small", files, TINY)
