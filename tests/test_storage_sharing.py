"""KVStore sharing by content: sessions of one tenant whose histories start alike hold one copy of the common
chunks in DRAM and on SSD, reference-counted; deletion, divergence inside a shared chunk, eviction, restart
and tenants behave. Real BlockPool, real files; the oracle is the KV each session saved (the common prefix
is saved with the same KV by every session, as the model computes it)."""

from __future__ import annotations

from pathlib import Path

import torch

from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVStore
from tests.kv_load import load_kv
from tests.test_storage_kv_store import BS, CHUNK, CHUNK_BYTES, D, H, L, make_pool, make_store, prepare, toks

SYSTEM = toks(3 * CHUNK, 5000)  # three whole chunks every conversation starts with


def kv_for(n: int, seed: int) -> torch.Tensor:
    return torch.randn(L, 2, n, H, D, generator=torch.Generator().manual_seed(seed))


PREFIX_KV = kv_for(len(SYSTEM), 99)


def save(store: KVStore, key: str, ids: list[int], kv: torch.Tensor, start: int = 0) -> None:
    pool = store.pool
    bt = BlockTable.allocate(pool, len(ids))
    pool.write(bt.slots(BS, 0, len(ids)), kv)
    store.save(key, ids, bt, start, len(ids))
    store.finish(key, ids)
    store.flush()
    bt.release(pool)


def conversation(store: KVStore, key: str, tail: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """A session whose history is SYSTEM then its own ``tail`` tokens; returns its ids and KV."""
    ids = SYSTEM + toks(tail, 10_000 * seed)
    kv = torch.cat([PREFIX_KV, kv_for(tail, seed)], dim=2)
    save(store, key, ids, kv)
    return ids, kv


def ssd_files(tmp_path: Path, prefix: str = "") -> list[str]:
    return sorted(p.name for p in (tmp_path / "ssd").iterdir() if p.name.startswith(prefix))


def test_common_chunks_are_held_once_and_serve_every_session(tmp_path):
    store = make_store(make_pool(), tmp_path)
    ids_a, kv_a = conversation(store, "t/a", 40, 1)
    ids_b, kv_b = conversation(store, "t/b", 50, 2)
    st = store.stats()
    assert st["shared_chunks"] == 3 and st["shared_chunks_deduplicated"] == 3
    # DRAM: three shared chunks once, plus each session's own two (a whole one, a partial one).
    assert st["occupancy_bytes_dram"] <= (3 + 2 * 2) * CHUNK_BYTES
    assert st["bytes_without_sharing_dram"] == st["occupancy_bytes_dram"] + 3 * CHUNK_BYTES
    # One content file per shared chunk, plus each session's whole own chunk (content no one else has yet).
    assert len(ssd_files(tmp_path, "c-")) == 3 + 2
    assert st["bytes_without_sharing_ssd"] > st["occupancy_bytes_ssd"]
    assert torch.equal(load_kv(store, "t/a", len(ids_a), ids_a), kv_a)
    assert torch.equal(load_kv(store, "t/b", len(ids_b), ids_b), kv_b)
    assert store.info("t/b")["tokens_shared"] == len(SYSTEM)
    store.close()


def test_a_new_session_starts_from_the_shared_chunks(tmp_path):
    store = make_store(make_pool(), tmp_path)
    conversation(store, "t/a", 40, 1)
    prompt = SYSTEM + toks(20, 777)
    assert store.lookup("t/new", prompt).tokens == 0  # nothing of its own yet: lookups stay pure
    result = prepare(store, "t/new", prompt)
    assert store.lookup("t/new", prompt) == (len(SYSTEM), "dram")
    assert result.shared_tokens == len(SYSTEM) and result.tier == "dram"
    assert torch.equal(load_kv(store, "t/new", len(SYSTEM), prompt), PREFIX_KV)
    assert store.stats()["tokens_reused_shared"] == len(SYSTEM)
    # A prompt that is the shared prefix exactly: the last token is computed, so the last chunk is copied
    # but for that token.
    prepare(store, "t/exact", SYSTEM)
    assert store.lookup("t/exact", SYSTEM).tokens == len(SYSTEM) - 1
    store.close()


def test_a_prompt_leaving_a_shared_chunk_part_way_copies_the_part_it_matches(tmp_path):
    store = make_store(make_pool(), tmp_path)
    conversation(store, "t/a", 40, 1)
    prompt = SYSTEM[:2 * CHUNK + 20] + toks(30, 31_000)
    result = prepare(store, "t/new", prompt)
    assert store.lookup("t/new", prompt) == (2 * CHUNK + 20, "dram")
    assert result.shared_tokens == 2 * CHUNK  # the copied part is its own
    assert torch.equal(load_kv(store, "t/new", 2 * CHUNK + 20, prompt), PREFIX_KV[:, :, :2 * CHUNK + 20])
    assert store.stats()["shared_tokens_copied"] == 20
    # Too short a match is not worth a copy.
    short = SYSTEM[:2 * CHUNK + 5] + toks(30, 32_000)
    prepare(store, "t/short", short)
    assert store.lookup("t/short", short).tokens == 2 * CHUNK
    store.close()


def test_tenants_share_nothing(tmp_path):
    store = make_store(make_pool(), tmp_path)
    conversation(store, "x/a", 40, 1)
    conversation(store, "y/b", 40, 2)
    assert store.stats()["shared_chunks"] == 0
    assert len(ssd_files(tmp_path, "c-")) == 2 * 4
    prepare(store, "y/new", SYSTEM + [1, 2])
    assert store.info("y/new")["tokens_shared"] == len(SYSTEM)  # y's own copy, with y/b
    prepare(store, "z/new", SYSTEM + [1, 2])
    assert store.lookup("z/new", SYSTEM + [1, 2]).tokens == 0
    store.close()


def test_deleting_a_session_removes_only_what_no_other_holds(tmp_path):
    store = make_store(make_pool(), tmp_path)
    conversation(store, "t/a", 40, 1)
    ids_b, kv_b = conversation(store, "t/b", 50, 2)
    assert store.delete("t/a")
    assert len(ssd_files(tmp_path, "c-")) == 3 + 1
    assert torch.equal(load_kv(store, "t/b", len(ids_b), ids_b), kv_b)
    assert store.delete("t/b")
    assert ssd_files(tmp_path) == [] and store.stats()["occupancy_bytes_dram"] == 0
    store.close()


def test_diverging_inside_a_shared_chunk_leaves_the_others_alone(tmp_path):
    store = make_store(make_pool(), tmp_path)
    ids_a, kv_a = conversation(store, "t/a", 40, 1)
    conversation(store, "t/b", 40, 2)
    # b's client edits its history inside the second shared chunk: b keeps a copy of what is left of it.
    cut = CHUNK + 10
    edited = SYSTEM[:cut] + toks(60, 4242)
    edited_kv = torch.cat([PREFIX_KV[:, :, :cut], kv_for(60, 3)], dim=2)
    prepare(store, "t/b", edited)
    assert store.lookup("t/b", edited).tokens == cut
    save(store, "t/b", edited, edited_kv, start=cut)
    assert torch.equal(load_kv(store, "t/b", len(edited), edited), edited_kv)
    assert torch.equal(load_kv(store, "t/a", len(ids_a), ids_a), kv_a)
    assert store.stats()["shared_chunks"] == 1  # only the first chunk is still in both
    store.close()


def test_evicted_shared_chunks_come_back_from_ssd_for_every_session(tmp_path):
    pool = make_pool(num_blocks=200)
    store = make_store(pool, tmp_path, dram_bytes=2 * CHUNK_BYTES)  # less than what they share
    sessions = {f"t/{i}": conversation(store, f"t/{i}", 20, i + 1) for i in range(4)}
    for i in range(4):  # other conversations push everything out of DRAM, what is shared last
        save(store, f"t/other{i}", toks(4 * CHUNK, 90_000 + 1000 * i), kv_for(4 * CHUNK, 50 + i))
    assert store.info("t/0")["tokens_dram"] < len(SYSTEM)
    for key, (ids, kv) in sessions.items():
        assert torch.equal(load_kv(store, key, len(ids), ids), kv), key
    store.close()


def test_restart_keeps_the_sharing(tmp_path):
    store = make_store(make_pool(), tmp_path)
    sessions = {key: conversation(store, key, 40 + i, i + 1) for i, key in enumerate(("t/a", "t/b", "t/c"))}
    store.close()
    store = make_store(make_pool(), tmp_path)
    st = store.stats()
    assert st["sessions"] == 3 and st["shared_chunks"] == 3
    assert len(ssd_files(tmp_path, "c-")) == 3 + 3
    for key, (ids, kv) in sessions.items():
        assert store.info(key)["tokens_shared"] == len(SYSTEM)
        assert torch.equal(load_kv(store, key, len(ids), ids), kv), key
    # A new session after the restart starts from them too.
    prepare(store, "t/new", SYSTEM + [3, 4])
    assert store.lookup("t/new", SYSTEM + [3, 4]).tokens == len(SYSTEM)
    store.close()


def test_content_files_no_session_lists_are_removed_at_start(tmp_path):
    store = make_store(make_pool(), tmp_path)
    conversation(store, "t/a", 40, 1)
    store.close()
    for manifest in (tmp_path / "ssd").glob("*.kvs"):
        manifest.unlink()  # as if the session was deleted just before a crash
    store = make_store(make_pool(), tmp_path)
    assert ssd_files(tmp_path, "c-") == []
    assert store.stats()["chunks_discarded_orphaned"] == 4
    # Its own chunk files no longer follow a prefix it holds: stale, removed, nothing served.
    assert store.lookup("t/a", SYSTEM + toks(40, 10_000)).tokens == 0
    store.close()


def test_a_forged_manifest_reaches_nothing(tmp_path):
    store = make_store(make_pool(), tmp_path)
    conversation(store, "t/a", 40, 1)
    store.close()
    manifest = next((tmp_path / "ssd").glob("*.kvs"))
    data = bytearray(manifest.read_bytes())
    data[-5] ^= 0xFF
    manifest.write_bytes(bytes(data))
    store = make_store(make_pool(), tmp_path)
    assert not manifest.exists() and store.stats()["chunks_discarded_checksum"] >= 1
    store.close()


def test_a_new_session_copies_from_another_sessions_growing_tail(tmp_path):
    """The system prompt ends inside a chunk no session has filled yet: a new session copies that part from
    the tail of a session that holds it."""
    store = make_store(make_pool(), tmp_path)
    system = SYSTEM[:2 * CHUNK + 25]
    ids = system + toks(3, 60_000)  # 2 whole chunks, then a partial one (28 tokens)
    kv = torch.cat([PREFIX_KV[:, :, :len(system)], kv_for(3, 7)], dim=2)
    save(store, "t/a", ids, kv)
    prompt = system + toks(10, 61_000)
    prepare(store, "t/new", prompt)
    assert store.lookup("t/new", prompt).tokens == len(system)
    assert torch.equal(load_kv(store, "t/new", len(system), prompt), PREFIX_KV[:, :, :len(system)])
    store.close()
