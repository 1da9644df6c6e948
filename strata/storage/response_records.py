"""Stored responses (/v1/responses with store: true) as a service keeps them: bounded, expiring, counted,
and shared between servers.

A record is one JSON document per response (the response object and the conversation the model saw),
kept for ``ttl_s`` (``--response-ttl``; OpenAI keeps 30 days) and at most ``tenant_quota_bytes`` per tenant
on each server (``--response-quota-mb``).

* Local copy: with an SSD tier, a file ``DIR/TENANT/ID.json`` (written whole, fsynced, renamed into place)
  whose bytes count in the SSD budget (space is reserved before the write, KV sessions are evicted to make
  room, records never are); its age is the file's mtime, so start-up reads no record. Without an SSD tier,
  memory (the quota still applies) that ends with the process.
* Shared copy (with ``remote``, the shared KV tier's store): the same bytes sealed with the servers' HMAC
  key under ``strata:resp:TENANT:ID``, expiring with the record. Any server then answers a retrieve,
  delete or cancel, and continues a chain whose server died. A deletion leaves a tombstone there, so a
  server holding a local copy never serves it again; a cancel leaves a flag that the server running the
  response polls. What comes back from the store is size-capped and verified before it is parsed.

The shared copy is an optimisation like the KV tier: every call has its timeout, a failure marks the store
down for a while, and the local copy answers meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strata.storage.chunk_file import ChunkError
from strata.storage.chunk_signing import ChunkSigner

if TYPE_CHECKING:
    from strata.storage.remote_tier import RemoteBackend
    from strata.storage.ssd_tier import SsdTier

log = logging.getLogger(__name__)

RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")
TENANT = re.compile(r"^[0-9a-z]{1,64}$")
MAX_RECORD_BYTES = 16 << 20  # larger than any request body the server accepts plus its output
DOWN_FOR_S = 10.0


class RecordQuotaExceeded(Exception):
    """The tenant's stored responses (or the SSD budget) leave no room for this one."""


class ResponseRecords:
    def __init__(self, directory: Path | None, *, ttl_s: float, tenant_quota_bytes: int,
                 ssd: SsdTier | None = None, remote: RemoteBackend | None = None,
                 signer: ChunkSigner | None = None) -> None:
        if remote is not None and signer is None:
            raise ValueError("a shared record store needs a signer")
        self.directory = directory
        self.ttl_s = ttl_s
        self.tenant_quota_bytes = tenant_quota_bytes
        self._ssd = ssd if directory is not None else None  # None: files outside any budget
        self._remote = remote
        self._signer = signer
        self._lock = threading.Lock()
        self._memory: dict[tuple[str, str], tuple[bytes, float]] = {}  # without a directory: (record, created)
        self._sizes: dict[tuple[str, str], int] = {}  # every local record's bytes, for quotas and the budget
        self._down_until = 0.0
        self.counters: dict[str, int] = {"stored": 0, "expired": 0, "refused_quota": 0, "remote_errors": 0,
                                         "remote_discarded": 0}
        if directory is not None:
            self._scan()

    # ------------------------------------------------------------------ the interface (any thread)

    def put(self, tenant: str, response_id: str, record: dict[str, Any]) -> None:
        """Store a record (replacing an earlier one of the same id). RecordQuotaExceeded when it does not fit
        the tenant's quota or the SSD budget."""
        _check(tenant, response_id)
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        if len(data) > MAX_RECORD_BYTES:
            raise RecordQuotaExceeded(f"the response record has {len(data)} bytes, more than {MAX_RECORD_BYTES}")
        key = (tenant, response_id)
        with self._lock:
            used = sum(n for (t, _), n in self._sizes.items() if t == tenant) - self._sizes.get(key, 0)
            if used + len(data) > self.tenant_quota_bytes:
                self.counters["refused_quota"] += 1
                raise RecordQuotaExceeded(f"stored responses of this API key would exceed "
                                          f"{self.tenant_quota_bytes >> 20} MiB; delete some or use store: false")
        self._put_local(key, data)
        self._put_remote(key, data, self.ttl_s)
        with self._lock:
            self.counters["stored"] += 1

    def get(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        """The record, from the shared store when it answers (a tombstone there hides a local copy), else
        from the local copy; None when unknown, expired or deleted."""
        if not (TENANT.match(tenant) and RESPONSE_ID.match(response_id)):
            return None
        key = (tenant, response_id)
        shared = self._get_remote(key)
        if shared == "deleted":
            self._drop_local(key)
            return None
        data = shared if isinstance(shared, bytes) else self._get_local(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def delete(self, tenant: str, response_id: str) -> bool:
        if not (TENANT.match(tenant) and RESPONSE_ID.match(response_id)):
            return False
        key = (tenant, response_id)
        existed = self.get(tenant, response_id) is not None
        self._drop_local(key)
        self._call_remote("delete", lambda r: (r.put(self._remote_key(key) + ":deleted", b"1", self.ttl_s),
                                                r.delete_many([self._remote_key(key)])))
        return existed

    @property
    def shared(self) -> bool:
        return self._remote is not None

    def mark_running(self, tenant: str, response_id: str, running: bool) -> None:
        """Say in the shared store that a response is being generated (so another server can cancel it)."""
        key = self._remote_key((tenant, response_id)) + ":running"
        self._call_remote("running mark", lambda r: r.put(key, b"1", 3600.0) if running else r.delete_many([key]))

    def is_running(self, tenant: str, response_id: str) -> bool:
        key = self._remote_key((tenant, response_id)) + ":running"
        got = self._call_remote("running read", lambda r: r.get_capped(key, 8))
        return bool(got and got[0])

    def request_cancel(self, tenant: str, response_id: str) -> None:
        """Ask whichever server runs the response to stop it (a flag in the shared store)."""
        key = (tenant, response_id)
        self._call_remote("cancel", lambda r: r.put(self._remote_key(key) + ":cancel", b"1", 3600.0))

    def cancel_requested(self, tenant: str, response_id: str) -> bool:
        key = (tenant, response_id)
        got = self._call_remote("cancel poll", lambda r: r.get_capped(self._remote_key(key) + ":cancel", 8))
        return bool(got and got[0])

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {f"responses_{k}": float(v) for k, v in self.counters.items()}
            out["responses_bytes"] = float(sum(self._sizes.values()))
            out["responses_count"] = float(len(self._sizes))
        return out

    # ------------------------------------------------------------------ local copy

    def _path(self, key: tuple[str, str]) -> Path:
        assert self.directory is not None
        return self.directory / key[0] / f"{key[1]}.json"

    def _scan(self) -> None:
        """Sizes of the records on disk (stat only); expired ones and temporary files go."""
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for tenant_dir in self.directory.iterdir():
            if not (tenant_dir.is_dir() and TENANT.match(tenant_dir.name)):
                continue
            for path in tenant_dir.iterdir():
                try:
                    st = path.stat()
                    if path.suffix != ".json" or not RESPONSE_ID.match(path.stem) or st.st_mtime + self.ttl_s < now:
                        path.unlink()
                        continue
                except OSError:
                    continue
                self._sizes[(tenant_dir.name, path.stem)] = st.st_size
        self._account(sum(self._sizes.values()))

    def _account(self, nbytes: int) -> None:
        """Bytes of records added (or, negative, removed) in the SSD budget."""
        if self._ssd is None or nbytes == 0:
            return
        with self._ssd.index.lock:
            self._ssd.index.ssd_used += nbytes
            if nbytes > 0:
                self._ssd.reserve_locked(0, None)  # over budget: KV sessions make room

    def _put_local(self, key: tuple[str, str], data: bytes) -> None:
        if self.directory is None:
            with self._lock:
                self._memory[key] = (data, time.time())
                self._sizes[key] = len(data)
            return
        ssd = self._ssd
        if ssd is not None:
            with ssd.index.lock:
                if not ssd.reserve_locked(len(data), None):
                    self.counters["refused_quota"] += 1
                    raise RecordQuotaExceeded("the SSD budget has no room for this response record")
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.tmp{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            if ssd is not None:
                with ssd.index.lock:
                    ssd.index.ssd_reserved -= len(data)
        with self._lock:
            old = self._sizes.get(key, 0)
            self._sizes[key] = len(data)
        self._account(len(data) - old)

    def _get_local(self, key: tuple[str, str]) -> bytes | None:
        now = time.time()
        if self.directory is None:
            with self._lock:
                held = self._memory.get(key)
            if held is not None and held[1] + self.ttl_s < now:
                self._drop_local(key, expired=True)
                return None
            return held[0] if held is not None else None
        path = self._path(key)
        try:
            if path.stat().st_mtime + self.ttl_s < now:
                self._drop_local(key, expired=True)
                return None
            return path.read_bytes()
        except OSError:
            return None

    def _drop_local(self, key: tuple[str, str], expired: bool = False) -> None:
        with self._lock:
            size = self._sizes.pop(key, 0)
            self._memory.pop(key, None)
            if expired and size:
                self.counters["expired"] += 1
        if self.directory is not None:
            try:
                self._path(key).unlink()
            except OSError:
                pass
            self._account(-size)

    # ------------------------------------------------------------------ shared copy

    def _remote_key(self, key: tuple[str, str]) -> str:
        return f"strata:resp:{key[0]}:{key[1]}"

    def _call_remote(self, what: str, fn: Any) -> Any:
        if self._remote is None or time.monotonic() < self._down_until:
            return None
        try:
            return fn(self._remote)
        except Exception as e:
            self._down_until = time.monotonic() + DOWN_FOR_S
            with self._lock:
                self.counters["remote_errors"] += 1
            log.warning("shared response store: %s failed (%s); not used for %.0f s", what, e, DOWN_FOR_S)
            return None

    def _put_remote(self, key: tuple[str, str], data: bytes, ttl_s: float) -> None:
        assert self._signer is not None or self._remote is None
        store_key = self._remote_key(key)
        self._call_remote("put", lambda r: (r.delete_many([store_key + ":deleted"]),
                                            r.put(store_key, self._signer.seal(store_key, data), ttl_s)))

    def _get_remote(self, key: tuple[str, str]) -> bytes | str | None:
        """The verified record bytes, "deleted" (a tombstone), or None (not there, or no answer)."""
        store_key = self._remote_key(key)
        signer = self._signer

        def fetch(r: RemoteBackend) -> bytes | str | None:
            if r.get_capped(store_key + ":deleted", 8)[0]:
                return "deleted"
            size, value = r.get_capped(store_key, MAX_RECORD_BYTES + 64)
            if size == 0 or signer is None:
                return None
            try:
                return bytes(signer.open(store_key, value))
            except ChunkError:
                with self._lock:
                    self.counters["remote_discarded"] += 1
                return None

        return self._call_remote("get", fetch)


def _check(tenant: str, response_id: str) -> None:
    if not TENANT.match(tenant) or not RESPONSE_ID.match(response_id):
        raise ValueError(f"bad response key {tenant!r}/{response_id!r}")
