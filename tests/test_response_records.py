"""Stored response records: quota, expiry, the SSD budget, and sharing through a real (TLS, password)
redis-server: another server's store answers, a deletion anywhere hides every copy, a forged record is
refused, a cancel flag crosses servers."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from strata.storage.chunk_file import ChunkLayout
from strata.storage.chunk_signing import ChunkSigner, parse_keys
from strata.storage.remote_tier import open_backend
from strata.storage.response_records import RecordQuotaExceeded, ResponseRecords
from strata.storage.session_index import SessionIndex
from strata.storage.ssd_tier import SsdTier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from cluster import RedisServer  # noqa: E402

TENANT = "0123456789abcdef"


def rid(i: int) -> str:
    return f"resp_{i:032x}"


def record(i: int, size: int = 100) -> dict:
    return {"response": {"id": rid(i)}, "messages": [{"role": "user", "content": "x" * size}]}


def ssd_tier(directory: Path, budget: int) -> SsdTier:
    index = SessionIndex(policy="lru", ttl_s=3600, dram_bytes=1 << 20, ssd_bytes=budget, token_bytes=1)
    return SsdTier(index, ChunkLayout("fp", 1, 1, 1, torch.float32), directory, chunk_tokens=16, pin=False)


def test_quota_expiry_and_the_ssd_budget(tmp_path: Path):
    ssd = ssd_tier(tmp_path / "ssd", budget=1 << 20)
    records = ResponseRecords(tmp_path / "responses", ttl_s=3600, tenant_quota_bytes=3000, ssd=ssd)
    records.put(TENANT, rid(1), record(1, 1000))
    records.put("public", rid(1), record(9, 1000))  # another tenant: its own quota, never seen by the first
    assert records.get(TENANT, rid(1)) == record(1, 1000)
    assert records.get("public", rid(1)) == record(9, 1000)
    used = ssd.index.ssd_used
    assert used == sum(p.stat().st_size for p in (tmp_path / "responses").rglob("*.json"))
    records.put(TENANT, rid(2), record(2, 1000))
    with pytest.raises(RecordQuotaExceeded):
        records.put(TENANT, rid(3), record(3, 1000))
    assert records.delete(TENANT, rid(2)) and records.get(TENANT, rid(2)) is None
    records.put(TENANT, rid(3), record(3, 1000))  # room again
    # Expired by age (the file's mtime): gone on read, and out of the budget.
    path = tmp_path / "responses" / TENANT / f"{rid(1)}.json"
    old = time.time() - 7200
    os.utime(path, (old, old))
    before, size = ssd.index.ssd_used, path.stat().st_size
    assert records.get(TENANT, rid(1)) is None and not path.exists()
    assert ssd.index.ssd_used == before - size
    # A restart counts what is on disk (stat only) and drops what expired meanwhile.
    os.utime(tmp_path / "responses" / "public" / f"{rid(1)}.json", (old, old))
    again = ResponseRecords(tmp_path / "responses", ttl_s=3600, tenant_quota_bytes=3000,
                            ssd=ssd_tier(tmp_path / "ssd2", budget=1 << 20))
    assert again.get("public", rid(1)) is None
    assert again.get(TENANT, rid(3)) == record(3, 1000)
    assert again.stats()["responses_count"] == 1


def test_a_full_ssd_budget_refuses_a_record(tmp_path: Path):
    ssd = ssd_tier(tmp_path / "ssd", budget=1500)
    records = ResponseRecords(tmp_path / "responses", ttl_s=3600, tenant_quota_bytes=1 << 20, ssd=ssd)
    records.put(TENANT, rid(1), record(1, 1000))
    with pytest.raises(RecordQuotaExceeded):
        records.put(TENANT, rid(2), record(2, 1000))


@pytest.fixture(scope="module")
def redis_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    store = RedisServer(tmp_path_factory.mktemp("redis"))
    yield store
    store.stop()


def shared(store: RedisServer, directory: Path, keys: bytes | None = None) -> ResponseRecords:
    backend = open_backend(store.url, 2.0, password=store.password, ca_file=str(store.ca_file))
    signer = ChunkSigner([keys] if keys else parse_keys(store.signing_key_file.read_text()))
    return ResponseRecords(directory, ttl_s=3600, tenant_quota_bytes=1 << 20, remote=backend, signer=signer)


def test_records_are_shared_and_deletion_hides_every_copy(redis_store: RedisServer, tmp_path: Path):
    a, b = shared(redis_store, tmp_path / "a"), shared(redis_store, tmp_path / "b")
    a.put(TENANT, rid(1), record(1))
    assert b.get(TENANT, rid(1)) == record(1)  # another server answers from the shared store
    assert b.get("public", rid(1)) is None  # tenants stay apart
    assert b.delete(TENANT, rid(1))
    assert a.get(TENANT, rid(1)) is None  # a's local copy is hidden by the tombstone ...
    assert not (tmp_path / "a" / TENANT / f"{rid(1)}.json").exists()  # ... and removed

    b.request_cancel(TENANT, rid(2))
    assert a.cancel_requested(TENANT, rid(2)) and not a.cancel_requested(TENANT, rid(3))


def test_a_forged_shared_record_is_refused(redis_store: RedisServer, tmp_path: Path):
    a = shared(redis_store, tmp_path / "a")
    mallory = shared(redis_store, tmp_path / "m", keys=b"m" * 32)  # the store's password, not the signing key
    mallory.put(TENANT, rid(5), record(5))
    assert a.get(TENANT, rid(5)) is None
    assert a.stats()["responses_remote_discarded"] == 1
