"""KVStore: round trips through DRAM and SSD, prefix semantics, budgets, eviction policies, TTL, pins,
layer-wise loading. Real BlockPool, real files, random tensors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVLoadError, KVStore, Prepared
from tests.kv_load import load_kv

L, H, D, BS = 4, 2, 16, 16
TOKEN_BYTES = L * 2 * H * D * 4  # float32
CHUNK = 32
CHUNK_BYTES = CHUNK * TOKEN_BYTES


def make_pool(num_blocks: int = 96) -> BlockPool:
    """A pool of num_blocks blocks per layer."""
    return BlockPool(L, H, D, BS, L * num_blocks, torch.float32)


def put_session(pool: BlockPool, n: int, seed: int) -> tuple[BlockTable, torch.Tensor]:
    """Fresh blocks holding random KV for n tokens; returns (block table, the KV [L, 2, n, H, D])."""
    bt = BlockTable.allocate(pool, n)
    kv = torch.randn(L, 2, n, H, D, generator=torch.Generator().manual_seed(seed))
    pool.write(bt.slots(BS, 0, n), kv)
    return bt, kv


def toks(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def store_session(store: KVStore, pool: BlockPool, key: str, ids: list[int], seed: int) -> torch.Tensor:
    bt, kv = put_session(pool, len(ids), seed)
    store.save(key, ids, bt, 0, len(ids))
    store.finish(key, ids)
    store.flush()
    bt.release(pool)
    return kv


def prepare(store: KVStore, key: str, ids: list[int], truncate: bool = False) -> Prepared:
    """What the engine does before scheduling a session request; returns once the store is done."""
    done: list[Prepared] = []
    ready = threading.Event()
    store.prepare(key, ids, truncate, lambda result: (done.append(result), ready.set()))
    assert ready.wait(30), "prepare never called back"
    store.flush()
    return done[0]


def make_store(pool: BlockPool, tmp_path: Path, **kw) -> KVStore:
    args = dict(model_fingerprint="test-model", dram_bytes=64 * CHUNK_BYTES, ssd_dir=tmp_path / "ssd",
                ssd_bytes=256 * CHUNK_BYTES, chunk_tokens=CHUNK)
    args.update(kw)
    return KVStore(pool, **args)


@pytest.fixture
def pool() -> BlockPool:
    return make_pool()


def test_round_trip_dram(pool, tmp_path):
    store = make_store(pool, tmp_path)
    kv = store_session(store, pool, "t:a", toks(100), seed=1)
    assert store.lookup("t:a", toks(100) + [7]) == (100, "dram")
    assert torch.equal(load_kv(store, "t:a", 100), kv)
    assert torch.equal(load_kv(store, "t:a", 40), kv[:, :, :40])
    st = store.stats()
    assert st["tokens_reused_dram"] == 140 and st["bytes_loaded_dram"] == 140 * TOKEN_BYTES
    store.close()


def test_round_trip_ssd_after_dram_eviction(pool, tmp_path):
    store = make_store(pool, tmp_path, dram_bytes=5 * CHUNK_BYTES)
    kv_a = store_session(store, pool, "t:a", toks(100), seed=1)
    kv_b = store_session(store, pool, "t:b", toks(100, 1000), seed=2)
    assert store.info("t:a")["tier"] == "ssd"
    assert store.lookup("t:a", toks(100)) == (100, "ssd")
    assert torch.equal(load_kv(store, "t:a", 100), kv_a)
    assert torch.equal(load_kv(store, "t:b", 100), kv_b)
    st = store.stats()
    assert st["evictions_dram"] > 0 and st["bytes_loaded_ssd"] > 0
    assert st["bytes_loaded_ssd"] + st["bytes_loaded_dram"] == 200 * TOKEN_BYTES
    assert st["tokens_reused_ssd"] + st["tokens_reused_dram"] == 200
    store.close()


def test_dram_only_store(pool, tmp_path):
    store = make_store(pool, tmp_path, ssd_dir=None, dram_bytes=4 * CHUNK_BYTES)
    kv = store_session(store, pool, "t:a", toks(60), seed=3)
    assert torch.equal(load_kv(store, "t:a", 60), kv)
    store_session(store, pool, "t:b", toks(100, 500), seed=4)  # no SSD: a's KV is dropped, never half-served
    hit = store.lookup("t:a", toks(60))
    if hit.tokens:
        assert torch.equal(load_kv(store, "t:a", hit.tokens), kv[:, :, :hit.tokens])
    assert store.stats()["occupancy_bytes_dram"] <= 4 * CHUNK_BYTES
    store.close()


def test_incremental_saves_store_only_new_tokens(pool, tmp_path):
    store = make_store(pool, tmp_path)
    ids = toks(90)
    bt, kv = put_session(pool, 90, seed=5)
    store.save("t:a", ids, bt, 0, 50)  # first turn's prompt
    store.save("t:a", ids, bt, 50, 51)  # decode steps, one token at a time
    store.save("t:a", ids, bt, 51, 52)
    store.finish("t:a", ids[:53])
    store.save("t:a", ids, bt, 0, 90)  # next turn saves the whole prompt: history is skipped
    store.flush()
    saved = store.stats()["bytes_saved_dram"]
    assert saved == 90 * TOKEN_BYTES
    assert store.lookup("t:a", ids) == (90, "dram")
    assert torch.equal(load_kv(store, "t:a", 90), kv)
    # A save starting past what is stored would leave a hole: dropped, nothing more is served.
    store.save("t:b", ids, bt, 10, 20)
    store.flush()
    assert store.lookup("t:b", ids).tokens == 0
    assert store.stats()["saves_dropped"] == 1
    store.close()


def test_longest_common_prefix_and_edited_history(pool, tmp_path):
    store = make_store(pool, tmp_path)
    ids = toks(100)
    kv = store_session(store, pool, "t:a", ids, seed=6)
    assert store.lookup("t:a", ids[:50]) == (50, "dram")  # a shorter prompt: no cut
    prepare(store, "t:a", ids[:50])
    assert store.info("t:a")["tokens"] == 100
    assert store.lookup("t:a", [1, 2, 3]) == (0, None)  # diverges at once: a miss...
    store.flush()
    assert store.info("t:a")["tokens"] == 100  # ... and a lookup changes nothing
    prepare(store, "t:a", [1, 2, 3])
    assert store.info("t:a")["tokens"] == 0  # the request's preparation cuts back to the divergence point
    kv = store_session(store, pool, "t:a", ids, seed=6)
    edited = ids[:70] + [9999] + ids[71:]
    assert store.lookup("t:a", edited) == (70, "dram")
    prepare(store, "t:a", edited)
    assert store.info("t:a")["tokens"] == 70
    assert store.lookup("t:a", ids) == (70, "dram")
    assert torch.equal(load_kv(store, "t:a", 70), kv[:, :, :70])
    with pytest.raises(KVLoadError):
        store.start_load("t:a", ids, 71, BlockTable(L))
    assert store.lookup("t:other", ids) == (0, None)
    store.close()


def test_cut_back_survives_restart(pool, tmp_path):
    store = make_store(pool, tmp_path)
    ids = toks(100)
    kv = store_session(store, pool, "t:a", ids, seed=7)
    prepare(store, "t:a", ids[:40] + [5555])
    store.close()
    store = make_store(make_pool(), tmp_path)
    assert store.info("t:a")["tokens"] == 40  # the cut chunk was rewritten, later ones deleted
    assert store.lookup("t:a", ids) == (40, "ssd")
    assert torch.equal(load_kv(store, "t:a", 40), kv[:, :, :40])
    store.close()


def test_budgets_never_exceeded_with_many_sessions(pool, tmp_path):
    dram, ssd = 6 * CHUNK_BYTES, 12 * CHUNK_BYTES + 4096
    store = make_store(pool, tmp_path, dram_bytes=dram, ssd_bytes=ssd)
    kvs = {}
    for i in range(24):
        key = f"t:{i}"
        kvs[key] = store_session(store, pool, key, toks(40 + i, 1000 * i), seed=100 + i)
        st = store.stats()
        assert st["occupancy_bytes_dram"] <= dram
        assert st["occupancy_bytes_ssd"] <= ssd
        on_disk = sum(p.stat().st_size for p in (tmp_path / "ssd").iterdir())
        assert on_disk <= ssd
        assert on_disk == st["occupancy_bytes_ssd"]
    assert store.stats()["evictions_ssd"] > 0
    served = 0
    for i, (key, kv) in enumerate(kvs.items()):
        hit = store.lookup(key, toks(40 + i, 1000 * i))
        if hit.tokens:
            served += 1
            assert torch.equal(load_kv(store, key, hit.tokens), kv[:, :, :hit.tokens])
    assert served >= 4
    store.close()


def _three_sessions(policy: str, tmp_path: Path) -> KVStore:
    pool = make_pool()
    store = make_store(pool, tmp_path, policy=policy, dram_bytes=2 * CHUNK_BYTES + 100)
    store_session(store, pool, "t:a", toks(CHUNK, 0), seed=1)
    store_session(store, pool, "t:b", toks(CHUNK, 100), seed=2)
    store.hint_upcoming(["t:a"])  # a's next request is first in the queue
    store_session(store, pool, "t:c", toks(CHUNK, 200), seed=3)  # DRAM holds two: someone goes to SSD
    return store


def test_eviction_scheduler_aware_differs_from_lru(tmp_path):
    sched = _three_sessions("scheduler", tmp_path / "s")
    assert sched.info("t:a")["tier"] == "dram"  # queued: protected although least recently used
    assert sched.info("t:b")["tier"] == "ssd"
    sched.close()
    lru = _three_sessions("lru", tmp_path / "l")
    assert lru.info("t:a")["tier"] == "ssd"  # plain LRU evicts the oldest, queued or not
    assert lru.info("t:b")["tier"] == "dram"
    lru.close()


def test_prefetch_for_queued_sessions(tmp_path):
    for policy in ("scheduler", "lru"):
        pool = make_pool()
        store = make_store(pool, tmp_path / policy, policy=policy, dram_bytes=2 * CHUNK_BYTES + 100)
        kv_a = store_session(store, pool, "t:a", toks(CHUNK, 0), seed=1)
        store_session(store, pool, "t:b", toks(CHUNK, 100), seed=2)
        store_session(store, pool, "t:c", toks(CHUNK, 200), seed=3)
        assert store.info("t:a")["tier"] == "ssd"
        store.hint_upcoming(["t:a", "t:zzz"])
        store.flush()
        st = store.stats()
        if policy == "scheduler":
            assert store.info("t:a")["tier"] == "dram" and st["prefetches_issued"] == 1
            assert store.lookup("t:a", toks(CHUNK)) == (CHUNK, "dram")
        else:
            assert store.info("t:a")["tier"] == "ssd" and st["prefetches_issued"] == 0
        assert torch.equal(load_kv(store, "t:a", CHUNK), kv_a)
        assert store.stats()["prefetches_used"] == (1 if policy == "scheduler" else 0)
        assert store.stats()["occupancy_bytes_dram"] <= 2 * CHUNK_BYTES + 100
        store.close()


def test_ttl_expiry_removes_every_tier(pool, tmp_path):
    store = make_store(pool, tmp_path, ttl_s=0.3)
    store_session(store, pool, "t:a", toks(50), seed=1)
    store_session(store, pool, "t:b", toks(50, 100), seed=2)
    store.pin("t:b", 60)
    assert len(list((tmp_path / "ssd").iterdir())) == 4
    time.sleep(0.5)
    assert store.lookup("t:a", toks(50)) == (0, None)  # a miss at once; the sweep removes it soon
    assert store.lookup("t:b", toks(50, 100)).tokens == 50  # pinned
    deadline = time.monotonic() + 5
    while store.stats()["expirations"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.stats()["expirations"] == 1
    assert len(list((tmp_path / "ssd").iterdir())) == 2
    assert store.info("t:a") is None
    store.close()


def test_pin_keeps_session_over_lru(tmp_path):
    pool = make_pool()
    store = make_store(pool, tmp_path, policy="lru", dram_bytes=2 * CHUNK_BYTES + 100,
                       ssd_bytes=3 * (CHUNK_BYTES + 4096))
    kv_a = store_session(store, pool, "t:a", toks(CHUNK, 0), seed=1)
    store.pin("t:a", 60)
    store_session(store, pool, "t:b", toks(CHUNK, 100), seed=2)
    store_session(store, pool, "t:c", toks(CHUNK, 200), seed=3)
    assert store.info("t:a")["tier"] == "dram" and store.info("t:b")["tier"] == "ssd"
    store_session(store, pool, "t:d", toks(CHUNK, 300), seed=4)  # SSD holds three files: b's go, not a's
    assert store.lookup("t:a", toks(CHUNK)).tokens == CHUNK
    assert torch.equal(load_kv(store, "t:a", CHUNK), kv_a)
    assert store.info("t:a")["tokens_ssd"] == CHUNK
    assert store.info("t:b") is None or store.info("t:b")["tokens"] == 0
    store.close()


def test_delete_and_info(pool, tmp_path):
    store = make_store(pool, tmp_path)
    store_session(store, pool, "tenant 1:sess/../x", toks(40), seed=1)  # opaque key, hashed for files
    info = store.info("tenant 1:sess/../x")
    assert info["tokens"] == 40 and info["ssd_bytes"] > 0 and info["dram_bytes"] > 0
    assert store.sessions() == ["tenant 1:sess/../x"]
    assert all(p.parent == tmp_path / "ssd" for p in (tmp_path / "ssd").iterdir())
    assert store.delete("tenant 1:sess/../x") and not store.delete("nope")
    assert list((tmp_path / "ssd").iterdir()) == []
    assert store.lookup("tenant 1:sess/../x", toks(40)) == (0, None)
    st = store.stats()
    assert st["occupancy_bytes_dram"] == 0 and st["occupancy_bytes_ssd"] == 0
    store.close()


@pytest.mark.parametrize("tier", ["dram", "ssd"])
def test_layer_wise_load(tmp_path, tier):
    pool = make_pool()
    store = make_store(pool, tmp_path, readahead_layers=1)
    kv = store_session(store, pool, "t:a", toks(70), seed=9)
    if tier == "ssd":
        store.close()
        store = make_store(pool, tmp_path, readahead_layers=1)
    assert store.lookup("t:a", toks(70)).tier == tier
    bt = BlockTable.allocate(pool, 70)
    s = bt.slots(BS, 0, 70)
    pool.write(s, torch.zeros(L, 2, 70, H, D))
    handle = store.start_load("t:a", toks(70), 70, bt)
    store.wait_layer(handle, 0, timeout=10)
    assert torch.equal(pool.read(s)[0], kv[0])
    time.sleep(0.2)  # the loader may run one layer ahead of the runner, not more
    assert handle.ready_layers <= 2
    assert not pool.read(s)[2:].any()
    store.wait_layer(handle, 1, timeout=10)
    assert torch.equal(pool.read(s)[1], kv[1])
    store.wait_layer(handle, 3, timeout=10)
    assert torch.equal(pool.read(s), kv)
    assert handle.done
    for _ in range(100):  # the loader books its time just after marking the last layer
        if store.stats()["load_seconds"] > 0:
            break
        time.sleep(0.01)
    st = store.stats()
    assert st["load_seconds"] > 0 and st["load_stall_seconds"] > 0  # the runner did wait for layers 2, 3
    # An abandoned load can be cancelled and does not block the next one.
    h2 = store.start_load("t:a", toks(70), 70, bt)
    h2.cancel()
    with pytest.raises(KVLoadError):
        store.wait_layer(h2, 3, timeout=10)
    assert torch.equal(load_kv(store, "t:a", 70), kv)
    store.close()


def test_concurrent_turns_with_background_eviction(tmp_path):
    """Many sessions, turns growing each time, saves racing with loads and write-backs under tight
    budgets: every hit must load exactly the KV that was saved for those tokens."""
    pool = make_pool(num_blocks=200)
    store = make_store(pool, tmp_path, dram_bytes=5 * CHUNK_BYTES, ssd_bytes=14 * CHUNK_BYTES)
    full = {f"t:{i}": torch.randn(L, 2, 160, H, D, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    hits = 0
    for turn in range(1, 6):
        for key, kv in full.items():
            n = 30 * turn + int(key[2:])
            ids = toks(n, 1000 * int(key[2:]))
            hit = store.lookup(key, ids)  # the previous turn's save may still be in flight
            assert hit.tokens <= n - 30  # never more than the last turn stored
            if hit.tokens:
                try:
                    assert torch.equal(load_kv(store, key, hit.tokens, ids), kv[:, :, :hit.tokens])
                    hits += 1
                except KVLoadError:  # evicted or cut in between: refused, and the store says so now
                    assert store.lookup(key, ids).tokens < hit.tokens
            bt = BlockTable.allocate(pool, n)
            pool.write(bt.slots(BS, 0, n), kv[:, :, :n])
            store.save(key, ids, bt, hit.tokens, n)
            store.finish(key, ids)
            bt.release(pool)
            st = store.stats()
            assert st["occupancy_bytes_dram"] <= 5 * CHUNK_BYTES
            assert st["occupancy_bytes_ssd"] <= 14 * CHUNK_BYTES
    assert hits > 0
    store.close()
