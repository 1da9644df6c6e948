"""SSD tier durability: restart, corrupt / foreign / truncated / temporary chunk files, and a process
killed with SIGKILL in the middle of saving. Nothing wrong may ever be served."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.chunk_file import ChunkLayout, read_header, validate_file
from strata.storage.kv_store import KVLoadError, KVStore
from strata.storage.ssd_scan import file_stem
from tests.kv_load import load_kv

L, H, D, BS = 4, 2, 16, 16
CHUNK = 32
TOKEN_BYTES = L * 2 * H * D * 4
REPO = Path(__file__).resolve().parents[1]
LAYOUT = ChunkLayout("fp", L, H, D, torch.float32)


def make_pool() -> BlockPool:
    return BlockPool(L, H, D, BS, L * 96, torch.float32)


def open_store(pool: BlockPool, ssd: Path, fingerprint: str = "model-a") -> KVStore:
    return KVStore(pool, model_fingerprint=fingerprint, dram_bytes=64 * CHUNK * TOKEN_BYTES, ssd_dir=ssd,
                   ssd_bytes=1 << 24, chunk_tokens=CHUNK)


def save_session(store: KVStore, key: str, ids: list[int], seed: int) -> torch.Tensor:
    pool = store.pool
    bt = BlockTable.allocate(pool, len(ids))
    kv = torch.randn(L, 2, len(ids), H, D, generator=torch.Generator().manual_seed(seed))
    pool.write(bt.slots(BS, 0, len(ids)), kv)
    store.save(key, ids, bt, 0, len(ids))
    store.finish(key, ids)
    store.flush()
    bt.release(pool)
    return kv


def chunk_files(ssd: Path) -> list[Path]:
    return sorted(p for p in ssd.iterdir() if p.suffix == ".kvc")


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, list[int], torch.Tensor]:
    """A closed store holding one 100-token session in 4 chunk files (32+32+32+4)."""
    ssd = tmp_path / "ssd"
    store = open_store(make_pool(), ssd)
    ids = list(range(500, 600))
    kv = save_session(store, "t:a", ids, seed=1)
    store.close()
    assert len(chunk_files(ssd)) == 4
    return ssd, ids, kv


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def test_restart_round_trip(stored):
    ssd, ids, kv = stored
    store = open_store(make_pool(), ssd)
    assert store.lookup("t:a", ids) == (100, "ssd")
    assert torch.equal(load_kv(store, "t:a", 100), kv)
    assert store.stats()["corrupt_chunks_discarded"] == 0
    store.close()


def test_flipped_payload_byte_is_discarded_on_first_read(stored):
    ssd, ids, kv = stored
    flip_byte(chunk_files(ssd)[1], 100)
    store = open_store(make_pool(), ssd)
    # Start-up reads headers only (its time grows with files, not bytes): the payload is checked when read.
    assert store.stats()["corrupt_chunks_discarded"] == 0
    assert store.lookup("t:a", ids) == (100, "ssd")
    bt = BlockTable.allocate(store.pool, 100)
    handle = store.start_load("t:a", ids, 100, bt)
    with pytest.raises(KVLoadError):
        for layer in range(L):
            store.wait_layer(handle, layer, timeout=10)
    bt.release(store.pool)
    st = store.stats()
    assert st["corrupt_chunks_discarded"] == 1 and st["chunks_discarded_checksum"] == 1
    assert store.lookup("t:a", ids) == (CHUNK, "ssd")  # chunks after the gap cannot be served either
    assert torch.equal(load_kv(store, "t:a", CHUNK), kv[:, :, :CHUNK])
    store.close()
    store = open_store(make_pool(), ssd)
    assert store.lookup("t:a", ids) == (CHUNK, "ssd")
    assert len(chunk_files(ssd)) == 1
    store.close()


def test_flipped_header_byte_is_discarded(stored):
    ssd, ids, kv = stored
    path = chunk_files(ssd)[0]
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01  # inside the JSON header
    path.write_bytes(bytes(data))
    store = open_store(make_pool(), ssd)
    assert store.stats()["corrupt_chunks_discarded"] == 1
    assert store.lookup("t:a", ids) == (0, None)
    assert chunk_files(ssd) == []
    store.close()


@pytest.mark.parametrize("field,value", [("token_ids", ["a"] * 32), ("token_ids", [-1] * 32),
                                         ("start", "0"), ("session_key", 7), ("layer_crc", [True] * L)])
def test_header_of_wrong_types_is_discarded(stored, field, value):
    """A header whose CRC holds but whose fields are of the wrong type (a crafted or foreign file): discarded
    at start-up like a corrupt one, never a crash or a served chunk."""
    ssd, ids, kv = stored
    path = chunk_files(ssd)[0]
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        header, offset = read_header(fd, dataclasses.replace(LAYOUT, fingerprint="model-a"), len(data))
    finally:
        os.close(fd)
    path.write_bytes(dataclasses.replace(header, **{field: value}).encode() + data[offset:])
    store = open_store(make_pool(), ssd)
    assert store.stats()["corrupt_chunks_discarded"] == 1
    assert store.lookup("t:a", ids) == (0, None)
    store.close()


def test_foreign_fingerprint_is_discarded(stored):
    ssd, ids, _ = stored
    store = open_store(make_pool(), ssd, fingerprint="model-b")
    st = store.stats()
    assert st["corrupt_chunks_discarded"] == 4 and st["chunks_discarded_fingerprint"] == 4
    assert store.lookup("t:a", ids) == (0, None)
    assert chunk_files(ssd) == []
    store.close()


def test_other_layout_is_discarded(stored):
    ssd, ids, _ = stored
    store = KVStore(BlockPool(L, 1, D, BS, L * 32, torch.float32), model_fingerprint="model-a",
                    dram_bytes=1 << 20, ssd_dir=ssd, ssd_bytes=1 << 24, chunk_tokens=CHUNK)
    assert store.stats()["chunks_discarded_fingerprint"] == 4
    assert store.lookup("t:a", ids) == (0, None)
    store.close()


def test_truncated_file_is_discarded(stored):
    ssd, ids, kv = stored
    last = chunk_files(ssd)[-1]
    os.truncate(last, last.stat().st_size - 10)
    store = open_store(make_pool(), ssd)
    assert store.stats()["chunks_discarded_truncated"] == 1
    assert store.lookup("t:a", ids) == (3 * CHUNK, "ssd")
    assert torch.equal(load_kv(store, "t:a", 3 * CHUNK), kv[:, :, :3 * CHUNK])
    store.close()


def test_leftover_temp_files_are_removed(stored):
    ssd, ids, kv = stored
    first = chunk_files(ssd)[0]
    shutil.copy(first, first.with_name(first.name + ".tmp1234abcd"))  # complete but never renamed
    (ssd / (first.name.replace("000000", "000004") + ".tmp99")).write_bytes(b"STRATAKV half")
    store = open_store(make_pool(), ssd)
    assert store.stats()["temp_files_removed"] == 2
    assert sorted(p.name for p in ssd.iterdir()) == [p.name for p in chunk_files(ssd)]
    assert store.lookup("t:a", ids) == (100, "ssd")
    assert torch.equal(load_kv(store, "t:a", 100), kv)
    store.close()


def test_chunk_of_another_session_is_not_served(tmp_path):
    ssd = tmp_path / "ssd"
    store = open_store(make_pool(), ssd)
    save_session(store, "t:a", list(range(64)), seed=1)
    save_session(store, "t:b", list(range(64)), seed=2)  # same ids, other KV
    files_a = [p for p in chunk_files(ssd) if p.name.startswith(file_stem("t:a"))]
    files_b = [p for p in chunk_files(ssd) if p not in files_a]
    store.close()
    shutil.copy(files_b[1], files_a[1])  # b's second chunk under a's name
    store = open_store(make_pool(), ssd)
    assert store.stats()["corrupt_chunks_discarded"] == 1
    assert store.lookup("t:a", list(range(64))) == (CHUNK, "ssd")
    store.close()


def test_corruption_found_while_loading(stored):
    ssd, ids, kv = stored
    store = open_store(make_pool(), ssd)
    assert store.lookup("t:a", ids) == (100, "ssd")
    flip_byte(chunk_files(ssd)[2], 50)  # bit rot after the start-up scan
    bt = BlockTable.allocate(store.pool, 100)
    handle = store.start_load("t:a", ids, 100, bt)
    with pytest.raises(KVLoadError):
        for layer in range(L):
            store.wait_layer(handle, layer, timeout=10)
    st = store.stats()
    assert st["corrupt_chunks_discarded"] == 1 and st["load_errors"] == 1
    assert store.lookup("t:a", ids) == (2 * CHUNK, "ssd")
    assert torch.equal(load_kv(store, "t:a", 2 * CHUNK), kv[:, :, :2 * CHUNK])
    store.close()
    store = open_store(make_pool(), ssd)  # and after a restart it stays gone
    assert store.lookup("t:a", ids).tokens == 2 * CHUNK
    store.close()


CHILD = r"""
import sys
import threading
from pathlib import Path
import torch
from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVStore

L, H, D, BS, CHUNK, NMAX = 4, 2, 16, 16, 32, 200

def variant_ids(i, v):
    return [1_000_000 * i + 1000 * v + t for t in range(NMAX)]

def variant_kv(i, v):
    return torch.randn(L, 2, NMAX, H, D, generator=torch.Generator().manual_seed(100 * i + v))

pool = BlockPool(L, H, D, BS, L * 64, torch.float32)
store = KVStore(pool, model_fingerprint="fp", dram_bytes=6 * CHUNK * L * 2 * H * D * 4,
                ssd_dir=Path(sys.argv[1]), ssd_bytes=1 << 26, chunk_tokens=CHUNK)
print("ready", flush=True)
turn = 0
while True:
    for i in range(5):
        v = (turn // 4 + i) % 3  # every few turns a session's history is replaced (edited)
        n = 10 + (37 * turn + 11 * i) % (NMAX - 10)
        ids, kv = variant_ids(i, v)[:n], variant_kv(i, v)
        bt = BlockTable.allocate(pool, n)
        pool.write(bt.slots(BS, 0, n), kv[:, :, :n])
        prepared = threading.Event()  # as the engine does: an edited history is cut back first
        store.prepare(f"s{i}", ids, False, lambda result: prepared.set())
        prepared.wait()
        store.save(f"s{i}", ids, bt, 0, n)
        store.finish(f"s{i}", ids)
        bt.release(pool)
    turn += 1
"""


def _variant_ids(i: int, v: int) -> list[int]:
    return [1_000_000 * i + 1000 * v + t for t in range(200)]


def _variant_kv(i: int, v: int) -> torch.Tensor:
    return torch.randn(L, 2, 200, H, D, generator=torch.Generator().manual_seed(100 * i + v))


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.9])
def test_sigkill_mid_save_serves_nothing_wrong(tmp_path, delay):
    ssd = tmp_path / "ssd"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ssd)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        deadline = time.time() + 30
        while len(chunk_files(ssd)) < 5 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay * random.uniform(0.8, 1.2))
        assert child.poll() is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    store = KVStore(make_pool(), model_fingerprint="fp", dram_bytes=1 << 22, ssd_dir=ssd, ssd_bytes=1 << 26,
                    chunk_tokens=CHUNK)
    assert not [p for p in ssd.iterdir() if ".tmp" in p.name]
    served = 0
    for i in range(5):
        info = store.info(f"s{i}")
        if info is None:
            continue
        # Which history is stored: read it from the first chunk's header.
        header = validate_file(ssd / f"{file_stem(f's{i}')}-000000.kvc", LAYOUT)
        v = header.token_ids[0] // 1000 % 1000
        tokens = store.lookup(f"s{i}", _variant_ids(i, v)).tokens
        # The stored ids are exactly a prefix of one history, and its KV is that history's KV.
        assert tokens == info["tokens"] > 0
        assert torch.equal(load_kv(store, f"s{i}", tokens), _variant_kv(i, v)[:, :, :tokens])
        served += 1
    assert served >= 1
    assert store.stats()["corrupt_chunks_discarded"] == 0  # a crash leaves no half-written chunk
    store.close()


def test_bfloat16_restart_round_trip(tmp_path):
    pool = BlockPool(L, H, D, BS, L * 32, torch.bfloat16)
    kwargs = dict(model_fingerprint="m", dram_bytes=1 << 20, ssd_dir=tmp_path, ssd_bytes=1 << 22, chunk_tokens=CHUNK)
    store = KVStore(pool, **kwargs)
    bt = BlockTable.allocate(pool, 70)
    kv = torch.randn(L, 2, 70, H, D).to(torch.bfloat16)
    pool.write(bt.slots(BS, 0, 70), kv)
    store.save("t:a", list(range(70)), bt, 0, 70)
    store.close()  # close flushes: the partial last chunk is written too
    pool.kv.zero_()
    store = KVStore(pool, **kwargs)
    assert store.lookup("t:a", list(range(70))) == (70, "ssd")
    store.wait_layer(store.start_load("t:a", list(range(70)), 70, bt), L - 1, timeout=10)
    assert torch.equal(pool.read(bt.slots(BS, 0, 70)), kv)
    store.close()
