"""The scheduler side of the KV store: which session holds which tokens in which tier.

One lock guards everything here and in the tiers: the entries, the content chunks they share, the
look-ahead window, pins, counters and the DRAM/SSD budget accounting.

Sharing: a whole chunk of plain model KV is registered under its content digest (:mod:`.content_chain`)
when it fills; a session that fills a chunk with the same digest drops its copy and references the
registered one, and a session whose prompt starts with registered chunks adopts them before its request
runs. A chunk belongs to every session in its ``owners``; it is dropped when the last one lets go of it,
and edited (cut) in place only when it has one owner: a session diverging inside a shared chunk gets a
copy of its part. The budgets count each chunk once. Methods whose names end in ``_locked`` expect the caller to hold
``lock``; the others take it. Nothing here waits on I/O (dropping a chunk only unlinks its file).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from strata.storage.content_chain import content_digest, prompt_digests, scope_of
from strata.storage.eviction import POLICIES
from strata.storage.session_entry import Chunk, SessionEntry, common_prefix
from strata.storage.ssd_scan import ScanResult, file_stem

# stats() reports these as 0 until they first happen, so dashboards see every series from the start.
_ZERO_KEYS = ("lookups_hit_dram", "lookups_hit_ssd", "lookups_miss", "tokens_reused_dram", "tokens_reused_ssd",
              "bytes_loaded_dram", "bytes_loaded_ssd", "bytes_saved_dram", "bytes_saved_ssd", "load_seconds",
              "load_stall_seconds", "load_stall_seconds_dram", "load_stall_seconds_ssd", "evictions_dram",
              "evictions_ssd", "expirations", "prefetches_issued", "prefetches_used", "corrupt_chunks_discarded",
              "temp_files_removed", "saves_dropped", "load_errors", "load_timeouts", "saves_dropped_queue_full",
              "tokens_reused_shared", "shared_chunks_adopted", "shared_chunks_deduplicated")


# A new session copies the part of a content chunk its prompt matches when it is at least this long (a
# device block); shorter is not worth a copy.
MIN_PARTIAL_TOKENS = 16


def _family(scope: str, parent: str) -> str:
    """The key of the content chunks that follow ``parent`` (a digest is already scoped; a first chunk's
    parent is not)."""
    return parent or f"root:{scope}"


class Hit(NamedTuple):
    tokens: int
    tier: str | None  # "dram" | "ssd" | None (miss); "ssd" when any reused chunk must come from disk


class SessionIndex:
    def __init__(self, *, policy: str, ttl_s: float, dram_bytes: int, ssd_bytes: int, token_bytes: int,
                 chunk_tokens: int = 256, windows: tuple[int | None, ...] | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.policy = policy
        self.ttl_s = ttl_s
        self.dram_bytes = dram_bytes
        self.ssd_bytes = ssd_bytes
        self.token_bytes = token_bytes
        self.chunk_tokens = chunk_tokens
        self.windows = windows  # per layer, its sliding window (None: full attention); see intact_upto_locked
        self.lock = threading.Lock()
        self.entries: dict[str, SessionEntry] = {}
        self.content: dict[str, Chunk] = {}  # digest -> the content chunk sessions share
        self.children: dict[str, set[Chunk]] = {}  # content chunks by tenant and parent (see _family)
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
            self.content = scan.content
            self.children = {}
            for chunk in self.content.values():
                self.children.setdefault(_family(chunk.scope, chunk.parent), set()).add(chunk)
            self.ssd_used = scan.ssd_bytes
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
            lcp = self.intact_upto_locked(entry.chunks, lcp)
            if lcp == 0:
                return Hit(0, None), diverges
            on_disk = any(c.dram is None for c in entry.chunks_for(lcp))
            tier = "remote" if entry.from_remote else "ssd" if on_disk else "dram"
            return Hit(lcp, tier), diverges

    def shared_prefix_locked(self, session_key: str, prompt_ids: list[int]) -> tuple[list[Chunk], int]:
        """The registered content chunks the prompt starts with (in its tenant), up to the first missing or
        unservable one, and how many tokens of the prompt the best next content chunk in DRAM (a child of the
        last) holds at its start (0: none worth copying). The last prompt token is never covered: it is
        always computed."""
        scope = scope_of(session_key)
        if scope is None or not self.content:
            return [], 0
        ids = prompt_ids[:-1]
        chunks: list[Chunk] = []
        for digest in prompt_digests(scope, ids, self.chunk_tokens):
            chunk = self.content.get(digest)
            if chunk is None or not chunk.servable or chunk.held_layers is not None:  # whole chunks only
                break
            chunks.append(chunk)
        start = len(chunks) * self.chunk_tokens
        rest = ids[start:start + self.chunk_tokens]
        best = max((common_prefix(tokens, rest) for _, tokens in self._next_chunks_locked(scope, chunks)), default=0)
        return chunks, (best if best >= MIN_PARTIAL_TOKENS else 0)

    def _next_chunks_locked(self, scope: str, chunks: list[Chunk]) -> Iterator[tuple[Chunk, list[int]]]:
        """Chunks in DRAM that follow ``chunks`` (content chunks of a tenant) in some session of that tenant,
        with their tokens: registered content chunks, and sessions' own growing tails (plain model KV)."""
        for child in self.children.get(_family(scope, (chunks[-1].digest or "") if chunks else ""), ()):
            if child.dram is not None and child.tokens and child.held_layers is None:
                yield child, child.tokens
        at = len(chunks)
        for key, entry in self.entries.items():
            if len(entry.chunks) <= at or scope_of(key) != scope or (at and entry.chunks[at - 1] is not chunks[-1]):
                continue
            tail = entry.chunks[at]
            if tail.digest is None and tail.dram is not None and tail.held_layers is None and (
                    entry.private_from is None or entry.private_from >= tail.end):
                yield tail, entry.tokens[tail.start:tail.end]

    def adoptable(self, session_key: str, prompt_ids: list[int]) -> bool:
        """Whether content chunks would cover more of the prompt than the session's own stored tokens."""
        with self.lock:
            chunks, partial = self.shared_prefix_locked(session_key, prompt_ids)
            entry = self.entries.get(session_key)
            own = common_prefix(entry.tokens, prompt_ids) if entry else 0
            return len(chunks) * self.chunk_tokens + partial > own

    def holds(self, session_key: str) -> bool:
        """Whether the session has stored tokens of its own."""
        with self.lock:
            entry = self.entries.get(session_key)
            return entry is not None and bool(entry.tokens)

    def shared_tokens(self, session_key: str, num_tokens: int) -> int:
        """Of the session's first ``num_tokens`` stored tokens, those in chunks other sessions share."""
        with self.lock:
            entry = self.entries.get(session_key)
            if entry is None:
                return 0
            return sum(min(c.end, num_tokens) - c.start for c in entry.chunks_for(num_tokens) if c.shared)

    def adopt_shared_locked(self, session_key: str, prompt_ids: list[int]) -> int:
        """Make the session start with the registered content chunks its prompt starts with, and a copy of the
        part of the next one that matches the prompt, when they cover more of the prompt than its own stored
        tokens do; returns the tokens adopted (0: nothing changed)."""
        chunks, partial = self.shared_prefix_locked(session_key, prompt_ids)
        covered = len(chunks) * self.chunk_tokens + partial
        entry = self.entries.get(session_key)
        own = common_prefix(entry.tokens, prompt_ids) if entry is not None else 0
        if covered <= own:
            return 0
        entry = self.entry_locked(session_key)
        keep = 0  # its leading chunks that are these very chunks stay
        while keep < len(entry.chunks) and keep < len(chunks) and entry.chunks[keep] is chunks[keep]:
            keep += 1
        self.cut_locked(entry, keep * self.chunk_tokens)
        for chunk in chunks[keep:]:
            chunk.owners.add(session_key)
            entry.chunks.append(chunk)
            entry.tokens.extend(prompt_ids[chunk.start:chunk.end])
        adopted = (len(chunks) - keep) * self.chunk_tokens
        self.counters["shared_chunks_adopted"] += len(chunks) - keep
        if partial:
            scope = scope_of(session_key)
            assert scope is not None
            start = len(chunks) * self.chunk_tokens
            source = next((c for c, tokens in self._next_chunks_locked(scope, chunks)
                           if common_prefix(tokens, prompt_ids[start:start + partial]) == partial), None)
            if source is not None and source.dram is not None and (
                    self.dram_used + partial * self.token_bytes <= self.dram_bytes):
                # Its own copy of the part that matches: the chunk goes on differently for this session.
                own_chunk = Chunk(index=len(entry.chunks), start=start, n=partial,
                                  dram=source.dram[:, :, :partial].clone(), owners={session_key})
                self.dram_used += own_chunk.dram_bytes
                entry.chunks.append(own_chunk)
                entry.tokens.extend(prompt_ids[start:start + partial])
                adopted += partial
                self.counters["shared_tokens_copied"] += partial
        entry.last_used = time.time()
        return adopted

    def register_locked(self, chunk: Chunk, digest: str, parent: str, scope: str, tokens: list[int]) -> None:
        """``chunk`` is now the content chunk ``digest`` (whole, plain KV of ``tokens`` after ``parent``)."""
        chunk.digest, chunk.parent, chunk.scope, chunk.tokens = digest, parent, scope, list(tokens)
        self.content[digest] = chunk
        self.children.setdefault(_family(scope, parent), set()).add(chunk)

    def seal_locked(self, entry: SessionEntry, chunk: Chunk) -> Chunk:
        """A chunk of ``entry`` just filled: register it as content if it is plain KV after content, or, if an
        equal chunk is registered already, drop this copy for it. Returns the chunk the entry now holds."""
        pos = entry.chunks.index(chunk)
        scope = scope_of(entry.key)
        parent = entry.chunks[pos - 1].digest if pos else ""
        if (scope is None or chunk.digest is not None or chunk.n < self.chunk_tokens or parent is None
                or (entry.private_from is not None and chunk.end > entry.private_from)):
            return chunk
        tokens = entry.tokens[chunk.start:chunk.end]
        digest = content_digest(scope, parent, tokens)
        same = self.content.get(digest)
        if same is None or not same.servable or same.held_layers is not None:  # whole chunks are shared
            if same is not None:
                self.unregister_locked(same)
            self.register_locked(chunk, digest, parent, scope, tokens)
            if chunk.ssd is not None:  # the file of its partial days: the content file replaces it
                self.drop_ssd_locked(chunk)
            return chunk
        self.drop_chunk_locked(chunk)
        chunk.owners.discard(entry.key)
        same.owners.add(entry.key)
        entry.chunks[pos] = same
        self.counters["shared_chunks_deduplicated"] += 1
        return same

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

    def orphaned_digests_locked(self, entry: SessionEntry) -> list[str]:
        """The content chunks only this session references (what its deletion removes everywhere)."""
        return [c.digest for c in entry.chunks if c.digest is not None and c.owners <= {entry.key}]

    def info(self, session_key: str) -> dict[str, Any] | None:
        with self.lock:
            entry = self.entries.get(session_key)
            if entry is None:
                return None
            in_dram = sum(c.n for c in entry.chunks if c.dram is not None)
            on_ssd = sum(c.n for c in entry.chunks if c.on_ssd)
            tier = None if not entry.tokens else "dram" if in_dram == len(entry.tokens) else "ssd"
            return {"session_key": entry.key, "tokens": len(entry.tokens), "tier": tier,
                    "tokens_dram": in_dram, "tokens_ssd": on_ssd,
                    "tokens_shared": sum(c.n for c in entry.chunks if c.shared), "dram_bytes": entry.dram_bytes(),
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
            shared = [c for c in self.content.values() if c.shared]
            out["shared_chunks"] = float(len(shared))
            # What the tiers would hold if every session kept its own copy of what it shares.
            out["bytes_without_sharing_dram"] = float(self.dram_used + sum(
                (len(c.owners) - 1) * c.dram_bytes for c in shared))
            out["bytes_without_sharing_ssd"] = float(self.ssd_used + sum(
                (len(c.owners) - 1) * c.ssd.nbytes for c in shared if c.ssd is not None))
            return out

    # ------------------------------------------------------------------ entries (lock held)

    def entry_locked(self, key: str) -> SessionEntry:
        entry = self.entries.get(key)
        if entry is None:
            entry = SessionEntry(key=key, file_stem=file_stem(key), last_used=time.time())
            self.entries[key] = entry
        return entry

    @staticmethod
    def live_locked(chunk: Chunk) -> bool:
        """Whether some session still holds ``chunk`` (a racing cut or delete may have dropped it)."""
        return bool(chunk.owners)

    def pinned_locked(self) -> set[str]:
        now = time.time()
        return {k for k, until in self.pins.items() if until > now}

    def intact_upto_locked(self, chunks: list[Chunk], n: int) -> int:
        """The most of the first ``n`` tokens of ``chunks`` a sequence can continue from: every sliding-window
        layer must hold the window a token at that position reads (chunks that gave a layer up end earlier)."""
        if self.windows is None:
            return n
        while n > 0:
            cut = min((c.start for c in chunks if c.held_layers is not None and c.start < n and any(
                w and layer not in c.held_layers and c.end > n - w + 1 for layer, w in enumerate(self.windows))),
                default=n)
            if cut == n:
                return n
            n = cut
        return 0

    def cut_locked(self, entry: SessionEntry, n: int) -> None:
        """Keep only the first ``n`` stored tokens (fewer when a window given up before ``n`` is needed
        there: the entry never holds tokens it could not be continued from)."""
        n = self.intact_upto_locked(entry.chunks, n)
        keep: list[Chunk] = []
        if entry.private_from is not None and n <= entry.private_from:
            entry.private_from = None  # what follows is computed afresh
        for i, chunk in enumerate(entry.chunks):
            if chunk.start >= n:
                self.release_locked(entry, chunk)
                continue
            if chunk.end > n and (chunk.digest is not None or chunk.shared):
                # A content chunk stops being one. Its bytes stay only in DRAM: shared, the session gets a
                # copy of its part; its own, it is unregistered (its content file no longer matches). Held
                # only on SSD, the session ends where it begins.
                if chunk.dram is None:
                    for later in entry.chunks[i:]:
                        self.release_locked(entry, later)
                    n = chunk.start
                    break
                if chunk.shared:
                    own = Chunk(index=chunk.index, start=chunk.start, n=chunk.n, dram=chunk.dram.clone(),
                                owners={entry.key}, held_layers=chunk.held_layers)
                    self.dram_used += own.dram_bytes
                    self.release_locked(entry, chunk)
                    chunk = own
                else:
                    self.unregister_locked(chunk)
                    if chunk.ssd is not None:
                        self.drop_ssd_locked(chunk)
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

    def repair_owners_locked(self, chunk: Chunk) -> None:
        """After a tier dropped data of ``chunk``: repair every session holding it."""
        for key in list(chunk.owners):
            entry = self.entries.get(key)
            if entry is not None:
                self.repair_locked(entry)

    def release_locked(self, entry: SessionEntry, chunk: Chunk) -> None:
        """``entry`` lets go of ``chunk`` (the caller takes it out of its list); the last owner drops it."""
        chunk.owners.discard(entry.key)
        if not chunk.owners:
            self.drop_chunk_locked(chunk)
            self.unregister_locked(chunk)

    def unregister_locked(self, chunk: Chunk) -> None:
        if chunk.digest is not None and self.content.get(chunk.digest) is chunk:
            del self.content[chunk.digest]
            family = _family(chunk.scope, chunk.parent)
            siblings = self.children.get(family)
            if siblings is not None:
                siblings.discard(chunk)
                if not siblings:
                    del self.children[family]
        chunk.digest = None

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
            self.release_locked(entry, chunk)
        entry.chunks = []
        entry.tokens = []
        entry.private_from = None
        if entry.manifest is not None:
            unlink(entry.manifest)
            entry.manifest = None
            entry.refs_written = []

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
