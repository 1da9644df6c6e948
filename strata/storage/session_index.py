"""The scheduler side of the KV store: which session holds which tokens in which tier.

One lock guards everything here and in the tiers: the entries, the look-ahead window, pins, counters
and the DRAM/SSD budget accounting. Methods whose names end in ``_locked`` expect the caller to hold
``lock``; the others take it. Nothing here waits on I/O (dropping a chunk only unlinks its file).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from strata.storage.eviction import POLICIES
from strata.storage.session_entry import Chunk, SessionEntry, common_prefix
from strata.storage.ssd_scan import ScanResult, file_stem

# stats() reports these as 0 until they first happen, so dashboards see every series from the start.
_ZERO_KEYS = ("lookups_hit_dram", "lookups_hit_ssd", "lookups_miss", "tokens_reused_dram", "tokens_reused_ssd",
              "bytes_loaded_dram", "bytes_loaded_ssd", "bytes_saved_dram", "bytes_saved_ssd", "load_seconds",
              "load_stall_seconds", "load_stall_seconds_dram", "load_stall_seconds_ssd", "evictions_dram",
              "evictions_ssd", "expirations", "prefetches_issued", "prefetches_used", "corrupt_chunks_discarded",
              "temp_files_removed", "saves_dropped", "load_errors", "load_timeouts", "saves_dropped_queue_full")


class Hit(NamedTuple):
    tokens: int
    tier: str | None  # "dram" | "ssd" | None (miss); "ssd" when any reused chunk must come from disk


class SessionIndex:
    def __init__(self, *, policy: str, ttl_s: float, dram_bytes: int, ssd_bytes: int, token_bytes: int) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.policy = policy
        self.ttl_s = ttl_s
        self.dram_bytes = dram_bytes
        self.ssd_bytes = ssd_bytes
        self.token_bytes = token_bytes
        self.lock = threading.Lock()
        self.entries: dict[str, SessionEntry] = {}
        self.window: dict[str, int] = {}  # look-ahead window: session -> place in the waiting queue
        self.pins: dict[str, float] = {}  # session -> pinned until (time.time())
        self.dram_used = 0
        self.ssd_used = 0
        self.ssd_reserved = 0  # bytes of chunk files being written, reserved before writing
        self.counters: Counter[str] = Counter()
        self._next_expiry = 0.0
        # Deletions, so saves queued before one do not bring the session back: each save records the epoch
        # it was queued in; a session deleted in a later epoch drops it. Emptied whenever no save waits.
        self.deletion_epoch = 0
        self.deleted_in_epoch: dict[str, int] = {}

    def adopt_scan(self, scan: ScanResult) -> None:
        """Start from what the SSD directory holds (after a restart)."""
        with self.lock:
            self.entries = scan.entries
            self.ssd_used = sum(e.ssd_bytes() for e in self.entries.values())
            self.counters["temp_files_removed"] += scan.temp_removed
            for reason, n in scan.discarded.items():
                self.counters[f"chunks_discarded_{reason}"] += n
                if reason != "stale":
                    self.counters["corrupt_chunks_discarded"] += n

    def count(self, name: str, n: float = 1) -> None:
        with self.lock:
            self.counters[name] += n

    # ------------------------------------------------------------------ scheduler-facing

    def lookup(self, session_key: str, prompt_ids: list[int]) -> tuple[Hit, bool]:
        """The longest stored prefix of the prompt, and whether the entry goes on past the point where the
        prompt diverges from it. No side effects (the scheduler may ask again and again): a request's
        preparation counts its lookup and cuts the entry back, its load marks the entry used."""
        with self.lock:
            entry = self.entries.get(session_key)
            lcp = common_prefix(entry.tokens, prompt_ids) if entry is not None else 0
            diverges = entry is not None and lcp < len(entry.tokens) and lcp < len(prompt_ids)
            if entry is None or lcp == 0 or self.expired_locked(session_key, entry, time.time()):
                return Hit(0, None), diverges
            on_disk = any(c.dram is None for c in entry.chunks_for(lcp))
            tier = "remote" if entry.from_remote else "ssd" if on_disk else "dram"
            return Hit(lcp, tier), diverges

    def count_lookup(self, hit: Hit) -> None:
        self.count(f"lookups_hit_{hit.tier}" if hit.tier else "lookups_miss")

    def set_window(self, session_keys: list[str]) -> list[str]:
        """The first sessions of the waiting queue that fit in DRAM become the look-ahead window;
        returns those of them with chunks only on SSD (to prefetch)."""
        with self.lock:
            window: dict[str, int] = {}
            used = 0
            fetch: list[str] = []
            for key in dict.fromkeys(session_keys):
                entry = self.entries.get(key)
                if entry is None or not entry.tokens:
                    continue
                size = len(entry.tokens) * self.token_bytes
                if used + size > self.dram_bytes:
                    break
                used += size
                window[key] = len(window)
                if any(c.dram is None for c in entry.chunks):
                    fetch.append(key)
            self.window = window
            return fetch

    def pin(self, session_key: str, seconds: float) -> None:
        with self.lock:
            self.pins[session_key] = time.time() + seconds

    def delete(self, session_key: str) -> bool:
        with self.lock:
            return self.delete_locked(session_key)

    def delete_locked(self, session_key: str) -> bool:
        self.deletion_epoch += 1
        self.deleted_in_epoch[session_key] = self.deletion_epoch
        entry = self.entries.pop(session_key, None)
        self.pins.pop(session_key, None)
        if entry is None:
            return False
        self.drop_all_locked(entry)
        return True

    def info(self, session_key: str) -> dict[str, Any] | None:
        with self.lock:
            entry = self.entries.get(session_key)
            if entry is None:
                return None
            in_dram = sum(c.n for c in entry.chunks if c.dram is not None)
            on_ssd = sum(c.n for c in entry.chunks if c.on_ssd)
            tier = None if not entry.tokens else "dram" if in_dram == len(entry.tokens) else "ssd"
            return {"session_key": entry.key, "tokens": len(entry.tokens), "tier": tier,
                    "tokens_dram": in_dram, "tokens_ssd": on_ssd, "dram_bytes": entry.dram_bytes(),
                    "ssd_bytes": entry.ssd_bytes(), "chunks": len(entry.chunks),
                    "last_used": entry.last_used, "pinned_until": self.pins.get(entry.key, 0.0),
                    "in_window": entry.key in self.window, "pending_saves": entry.pending_saves}

    def sessions(self) -> list[str]:
        with self.lock:
            return [k for k, e in self.entries.items() if e.tokens]

    def stats(self) -> dict[str, float]:
        with self.lock:
            out: dict[str, float] = {k: float(v) for k, v in self.counters.items()}
            for name in _ZERO_KEYS:
                out.setdefault(name, 0.0)
            out["load_overlap_seconds"] = max(0.0, out["load_seconds"] - out["load_stall_seconds"])
            out["occupancy_bytes_dram"] = float(self.dram_used)
            out["occupancy_bytes_ssd"] = float(self.ssd_used)
            out["capacity_bytes_dram"] = float(self.dram_bytes)
            out["capacity_bytes_ssd"] = float(self.ssd_bytes)
            out["sessions"] = float(sum(1 for e in self.entries.values() if e.tokens))
            return out

    # ------------------------------------------------------------------ entries (lock held)

    def entry_locked(self, key: str) -> SessionEntry:
        entry = self.entries.get(key)
        if entry is None:
            entry = SessionEntry(key=key, file_stem=file_stem(key), last_used=time.time())
            self.entries[key] = entry
        return entry

    def holds_locked(self, entry: SessionEntry, chunk: Chunk) -> bool:
        """Whether ``chunk`` is still part of the live ``entry`` (a racing cut or delete may have dropped it)."""
        return self.entries.get(entry.key) is entry and any(c is chunk for c in entry.chunks)

    def pinned_locked(self) -> set[str]:
        now = time.time()
        return {k for k, until in self.pins.items() if until > now}

    def cut_locked(self, entry: SessionEntry, n: int) -> None:
        """Keep only the first ``n`` stored tokens."""
        keep: list[Chunk] = []
        for chunk in entry.chunks:
            if chunk.start >= n:
                self.drop_chunk_locked(chunk)
                continue
            if chunk.end > n:
                chunk.n = n - chunk.start
                chunk.version += 1
                if chunk.ssd is not None:
                    chunk.ssd.valid_tokens = min(chunk.ssd.valid_tokens, chunk.n)
                if chunk.dram is not None and entry.active_loads:
                    # Copy on write: a load in flight may still read the positions new tokens will overwrite.
                    old = chunk.dram
                    chunk.dram = old[:, :, :chunk.n].clone()
                    self.dram_used += chunk.dram.nbytes - old.nbytes
            keep.append(chunk)
        entry.chunks = keep
        del entry.tokens[n:]

    def repair_locked(self, entry: SessionEntry) -> None:
        """After a tier dropped data: the session is readable up to its first chunk held nowhere."""
        for chunk in entry.chunks:
            if not chunk.servable:
                self.cut_locked(entry, chunk.start)
                return

    def drop_chunk_locked(self, chunk: Chunk) -> None:
        if chunk.dram is not None:
            self.dram_used -= chunk.dram.nbytes
            chunk.dram = None
        if chunk.ssd is not None:
            self.drop_ssd_locked(chunk)

    def drop_ssd_locked(self, chunk: Chunk) -> None:
        assert chunk.ssd is not None
        unlink(chunk.ssd.path)
        self.ssd_used -= chunk.ssd.nbytes
        chunk.ssd = None

    def drop_all_locked(self, entry: SessionEntry) -> None:
        for chunk in entry.chunks:
            self.drop_chunk_locked(chunk)
        entry.chunks = []
        entry.tokens = []

    # ------------------------------------------------------------------ TTL

    def expire_periodic(self) -> None:
        """Background upkeep (the I/O thread when idle): TTL expiry even when no lookups come."""
        with self.lock:
            self.maybe_expire_locked(time.time())

    def maybe_expire_locked(self, now: float) -> None:
        if now >= self._next_expiry:
            self._next_expiry = now + min(1.0, self.ttl_s / 4)  # a scan of every entry at most this often
            self.expire_locked(now)

    def expired_locked(self, key: str, entry: SessionEntry, now: float) -> bool:
        """Idle past the TTL and not pinned: a miss already, before the background sweep removes it."""
        return now - entry.last_used > self.ttl_s and self.pins.get(key, 0.0) <= now

    def expire_locked(self, now: float) -> None:
        """TTL: a session idle for ttl_s leaves every tier (unless pinned, queued, or in use)."""
        pinned = self.pinned_locked()
        for key, entry in list(self.entries.items()):
            if key in pinned or key in self.window or entry.active_loads or entry.pending_saves:
                continue
            if now - entry.last_used > self.ttl_s or not entry.chunks:
                if entry.chunks:
                    self.counters["expirations"] += 1
                self.drop_all_locked(entry)
                del self.entries[key]
        self.pins = {k: v for k, v in self.pins.items() if v > now}


def unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
