"""KVStore safety under concurrency: loads verified against token ids, delayed free of a cancelled
load's blocks, bounded waits (timeouts), and the byte-bounded save queue. Real pool, real threads."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from strata.kernels.rotary import rope_inv_freq
from strata.storage import kv_loader
from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVLoadError, KVStore
from tests.kv_load import load_kv
from tests.test_storage_kv_store import (
    BS,
    CHUNK,
    TOKEN_BYTES,
    D,
    H,
    L,
    make_pool,
    make_store,
    prepare,
    put_session,
    store_session,
    toks,
)


@pytest.fixture
def pool():
    return make_pool()


def block(thread) -> threading.Event:
    """Hold a store thread (saver, loader) on a queued job until the returned event is set."""
    gate = threading.Event()
    thread.put(lambda: gate.wait(30))
    return gate


def poisoned(pool, n: int) -> tuple[BlockTable, torch.Tensor]:
    bt = BlockTable.allocate(pool, n)
    s = bt.slots(BS, 0, n)
    pool.write(s, torch.full((L, 2, n, H, D), 7.0))
    return bt, s


def test_stats_report_the_new_keys(pool, tmp_path):
    store = make_store(pool, tmp_path)
    st = store.stats()
    assert st["load_timeouts"] == 0 and st["saves_dropped_queue_full"] == 0 and st["save_queue_bytes"] == 0
    store.close()


def test_start_load_checks_token_ids_after_a_concurrent_edit(pool, tmp_path):
    store = make_store(pool, tmp_path)
    ids = toks(100)
    kv = store_session(store, pool, "t:a", ids, seed=1)
    assert store.lookup("t:a", ids + [5]) == (100, "dram")
    # Before the load starts, another request of the same session saves a history that diverges at 40.
    other = ids[:40] + toks(60, 5000)
    bt, kv2 = put_session(pool, 100, seed=2)
    store.save("t:a", other, bt, 0, 100)
    store.flush()
    bt.release(pool)
    assert store.tokens("t:a") == other  # as long as before: only the ids tell the difference
    with pytest.raises(KVLoadError):
        store.start_load("t:a", ids, 100, BlockTable(L))
    with pytest.raises(KVLoadError):
        store.start_load("t:a", ids, 41, BlockTable(L))
    with pytest.raises(KVLoadError):
        store.start_load("t:a", ids[:50], 60, BlockTable(L))  # the requester's ids must cover num_tokens
    assert torch.equal(load_kv(store, "t:a", 40, ids), kv[:, :, :40])  # the shared prefix still loads
    assert torch.equal(load_kv(store, "t:a", 100, other), torch.cat([kv[:, :, :40], kv2[:, :, 40:]], dim=2))
    # A cut-back (edited history) between lookup and start_load: fewer tokens than asked for.
    assert store.lookup("t:a", other + [1]) == (100, "dram")
    prepare(store, "t:a", other[:10] + [777])
    with pytest.raises(KVLoadError):
        store.start_load("t:a", other, 100, BlockTable(L))
    assert torch.equal(load_kv(store, "t:a", 10, other), kv[:, :, :10])
    assert store.stats()["load_errors"] == 0
    store.close()


def test_cancelled_load_is_released_only_once_the_loader_stopped_writing(pool, tmp_path, monkeypatch):
    store = make_store(pool, tmp_path)
    ids = toks(70)
    store_session(store, pool, "t:a", ids, seed=3)
    copying = threading.Event()
    real_copy = kv_loader.copy_kv_slots

    def slow_copy(*args) -> None:  # a slow transfer: cancel() lands in the middle of a layer
        copying.set()
        time.sleep(0.2)
        real_copy(*args)

    monkeypatch.setattr(kv_loader, "copy_kv_slots", slow_copy)
    bt, s = poisoned(pool, 70)
    handle = store.start_load("t:a", ids, 70, bt)
    assert copying.wait(5)
    handle.cancel()
    assert not handle.released  # the loader is still copying into the blocks
    assert handle.wait_released(5)
    pool.write(s, torch.full((L, 2, 70, H, D), -1.0))  # the engine reuses the blocks
    time.sleep(0.5)
    assert (pool.read(s) == -1.0).all()  # nothing written after release
    with pytest.raises(KVLoadError):
        store.wait_layer(handle, L - 1, timeout=1)
    store.close()


def test_load_cancelled_before_it_began_is_released_at_once(pool, tmp_path):
    store = make_store(pool, tmp_path, readahead_layers=1)
    ids = toks(70)
    kv = store_session(store, pool, "t:a", ids, seed=4)
    bt1 = BlockTable.allocate(pool, 70)
    first = store.start_load("t:a", ids, 70, bt1)  # never waited on: the loader stops after layer 0
    for _ in range(500):
        if first.ready_layers:
            break
        time.sleep(0.01)
    assert first.ready_layers == 1 and not first.released
    bt2, s2 = poisoned(pool, 70)
    second = store.start_load("t:a", ids, 70, bt2)  # queued behind the first
    second.cancel()
    assert second.released  # the loader never picked it up: its blocks are free at once
    first.cancel()
    assert first.wait_released(5)
    time.sleep(0.3)  # the loader dequeues the cancelled load and must leave its blocks alone
    assert (pool.read(s2) == 7.0).all()
    assert torch.equal(load_kv(store, "t:a", 70, ids), kv)  # and the loader goes on with the next one
    store.close()


def test_waits_time_out(pool, tmp_path, caplog):
    store = make_store(pool, tmp_path, rope_inv_freq=rope_inv_freq(D, 10000.0, None))
    ids = toks(100)
    store_session(store, pool, "t:a", ids, seed=5)
    gate = block(store.saver.thread)
    t0 = time.monotonic()
    with pytest.raises(KVLoadError):
        store.tokens("t:a", timeout=0.2)
    with pytest.raises(KVLoadError):
        store.truncate("t:a", 10, 20, timeout=0.2)
    assert store.flush(timeout=0.2) is False
    assert time.monotonic() - t0 < 3
    # wait_layer: a load queued behind a stuck loader; the timeout is counted.
    loader_gate = block(store.loader.thread)
    handle = store.start_load("t:a", ids, 100, BlockTable.allocate(pool, 100))
    with pytest.raises(KVLoadError):
        store.wait_layer(handle, 0, timeout=0.1)
    assert store.stats()["load_timeouts"] == 1
    handle.cancel()
    assert handle.released
    loader_gate.set()
    gate.set()
    assert store.flush(timeout=10)
    assert store.tokens("t:a") == ids  # the abandoned truncation did not run
    # close: a stuck saver makes it log and return, not hang.
    gate = block(store.saver.thread)
    caplog.set_level(logging.WARNING)
    t0 = time.monotonic()
    store.close(timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert "still pending" in caplog.text
    gate.set()


def test_full_save_queue_drops_saves_without_copying(pool, tmp_path, monkeypatch):
    store = make_store(pool, tmp_path, save_queue_bytes=40 * TOKEN_BYTES)
    ids, ids_b = toks(100), toks(20, 900)
    bt, kv = put_session(pool, 100, seed=6)
    bt_b, kv_b = put_session(pool, 20, seed=7)
    reads = []
    real_read = pool.read
    monkeypatch.setattr(pool, "read", lambda slots: reads.append(len(slots)) or real_read(slots))
    gate = block(store.saver.thread)
    store.save("t:a", ids, bt, 0, 30)  # fits
    assert store.stats()["save_queue_bytes"] == 30 * TOKEN_BYTES
    store.save("t:a", ids, bt, 30, 60)  # 30 + 30 > 40: dropped
    store.save("t:a", ids, bt, 60, 70)  # fits, but [30, 60) is missing: dropped by the saver as a hole
    store.save("t:b", ids_b, bt_b, 0, 20)  # 40 + 20 > 40: dropped
    assert len(reads) == 2  # the dropped saves copied nothing out of the blocks
    st = store.stats()
    assert st["saves_dropped_queue_full"] == 2 and st["save_queue_bytes"] == 40 * TOKEN_BYTES
    assert store.info("t:b") is None or store.info("t:b")["tokens"] == 0
    gate.set()
    assert store.flush(timeout=10)
    st = store.stats()
    assert st["save_queue_bytes"] == 0 and st["saves_dropped"] == 1
    assert store.lookup("t:a", ids) == (30, "dram")  # never a hole: the stored KV ends at the dropped range
    assert torch.equal(load_kv(store, "t:a", 30, ids), kv[:, :, :30])
    assert store.lookup("t:b", ids_b) == (0, None)
    # Unblocked: the next turn saves from where the session ends, other sessions save normally.
    store.save("t:a", ids, bt, 30, 60)
    assert store.flush(timeout=10)
    store.save("t:b", ids_b, bt_b, 0, 20)
    assert store.flush(timeout=10)
    assert store.lookup("t:a", ids) == (60, "dram") and store.lookup("t:b", ids_b) == (20, "dram")
    assert torch.equal(load_kv(store, "t:a", 60, ids), kv[:, :, :60])
    assert torch.equal(load_kv(store, "t:b", 20, ids_b), kv_b)
    assert store.stats()["saves_dropped_queue_full"] == 2
    store.close()


def test_one_save_larger_than_the_bound_still_gets_through(pool, tmp_path):
    store = make_store(pool, tmp_path, save_queue_bytes=CHUNK * TOKEN_BYTES)
    kv = store_session(store, pool, "t:a", toks(90), seed=8)  # 90 tokens > the bound, nothing waiting
    assert store.lookup("t:a", toks(90)) == (90, "dram")
    assert torch.equal(load_kv(store, "t:a", 90), kv)
    assert store.stats()["saves_dropped_queue_full"] == 0
    store.close()


def test_close_without_timeout_still_writes_back(pool, tmp_path):
    store = make_store(pool, tmp_path)
    kv = store_session(store, pool, "t:a", toks(40), seed=9)
    store.close(timeout=None)
    store = KVStore(make_pool(), model_fingerprint="test-model", dram_bytes=1 << 22, ssd_dir=tmp_path / "ssd",
                    ssd_bytes=1 << 24, chunk_tokens=CHUNK)
    assert store.lookup("t:a", toks(40)) == (40, "ssd")
    assert torch.equal(load_kv(store, "t:a", 40), kv)
    store.close()
