"""The DRAM tier: each session's KV in host-memory chunks, appended to as saves arrive.

A chunk holds up to ``chunk_tokens`` tokens and grows (doubling, from a small capacity) while it fills,
so a session of a few tokens does not cost a whole chunk. The budget counts chunk tensors by capacity.
Making room evicts chunks (the tail of the victim session first, chunks other sessions share last); a
chunk with no SSD copy is written back first, or, if it cannot be, dropped and its sessions cut back there.
A chunk that fills is sealed (:meth:`SessionIndex.seal_locked`): registered for sharing, or swapped for the
equal chunk another session stored first. Once no later token of its session reads a chunk at a
sliding-window layer (it ends a window before the session does), the chunk gives those layers up
(``trim_windows_locked``): a session of a model with 5 local layers in 6 keeps little more than a sixth of
its history's KV, in every tier (the SSD file is rewritten smaller on its next write-back).
"""

from __future__ import annotations

import torch

from strata.storage.eviction import eviction_order
from strata.storage.session_entry import Chunk, SessionEntry
from strata.storage.session_index import SessionIndex
from strata.storage.ssd_tier import SsdTier

_MIN_CAPACITY = 16  # tokens a new chunk has room for before it grows


class DramTier:
    def __init__(self, index: SessionIndex, ssd: SsdTier, *, num_layers: int, chunk_tokens: int,
                 pin: bool) -> None:
        self.index = index
        self.ssd = ssd
        self.num_layers = num_layers
        self.chunk_tokens = chunk_tokens
        self._pin = pin  # pinned chunks on a GPU host: async DMA, readable by the copy kernel

    # ------------------------------------------------------------------ appending

    def append(self, entry: SessionEntry, ids: list[int], pos: int, kv: torch.Tensor) -> None:
        """Store KV of tokens ids[pos:] (kv holds exactly those) into the entry's DRAM chunks.

        Called without the lock. Stops (counting a dropped save) if the entry changed under it or
        no room can be made: the stored tokens then simply end earlier, never with a hole.
        """
        index = self.index
        done = 0
        total = len(ids) - pos
        for _attempt in range(64 + 4 * total):  # bounded: racing evictions could otherwise loop forever
            if done == total:
                return
            with index.lock:
                if index.entries.get(entry.key) is not entry or len(entry.tokens) != pos + done:
                    index.counters["saves_dropped"] += 1
                    return
                target, take, extra = self._plan_locked(entry, total - done)
                if index.dram_used + extra <= index.dram_bytes:
                    self._write_locked(entry, target, ids[pos + done:pos + done + take], kv[:, :, done:done + take])
                    done += take
                    continue
            if not self.make_room(extra, protect=target):
                index.count("saves_dropped")
                return
        index.count("saves_dropped")

    def _plan_locked(self, entry: SessionEntry, remaining: int) -> tuple[Chunk | None, int, int]:
        """Where the next tokens go: (chunk to append to or None for a new one, tokens, extra DRAM bytes)."""
        token_bytes = self.index.token_bytes
        last = entry.chunks[-1] if entry.chunks else None
        if last is not None and last.dram is not None and last.n < self.chunk_tokens:
            take = min(self.chunk_tokens - last.n, remaining)
            cap = last.dram.shape[2]
            new_cap = cap if last.n + take <= cap else min(self.chunk_tokens, max(last.n + take, 2 * cap))
            return last, take, (new_cap - cap) * token_bytes
        take = min(self.chunk_tokens, remaining)
        return None, take, min(self.chunk_tokens, max(take, _MIN_CAPACITY)) * token_bytes

    def _write_locked(self, entry: SessionEntry, target: Chunk | None, ids: list[int], kv: torch.Tensor) -> None:
        index = self.index
        take = len(ids)
        if target is None:
            cap = min(self.chunk_tokens, max(take, _MIN_CAPACITY))
            target = Chunk(index=len(entry.chunks), start=len(entry.tokens), owners={entry.key})
            target.dram = self._empty(cap, kv)
            entry.chunks.append(target)
            index.dram_used += target.dram.nbytes
        assert target.dram is not None
        if target.n + take > target.dram.shape[2]:
            grown = self._empty(min(self.chunk_tokens, max(target.n + take, 2 * target.dram.shape[2])), kv)
            grown[:, :, :target.n] = target.dram[:, :, :target.n]
            index.dram_used += grown.nbytes - target.dram.nbytes
            target.dram = grown  # a loader holding the old tensor still reads valid [:n]
        target.dram[:, :, target.n:target.n + take] = kv
        target.n += take
        target.version += 1
        entry.tokens.extend(ids)
        index.counters["bytes_saved_dram"] += take * index.token_bytes
        if target.n >= self.chunk_tokens:
            index.seal_locked(entry, target)
            self.ssd.queue_writeback_locked(entry.key)

    def trim_windows_locked(self, entry: SessionEntry) -> None:
        """Give up the sliding-window layers of the entry's DRAM chunks that no later token reads: those that
        end at least a window before the session (whose own tokens only: a chunk other sessions share may
        still be read by them)."""
        index, windows = self.index, self.index.windows
        if windows is None:
            return
        end = len(entry.tokens)
        for chunk in entry.chunks:
            if chunk.end > end - min(w for w in windows if w) + 1:
                break  # later chunks end later still
            held = chunk.held_layers if chunk.held_layers is not None else tuple(range(self.num_layers))
            keep = tuple(layer for layer in held if not windows[layer] or chunk.end > end - windows[layer] + 1)
            if chunk.dram is None or chunk.shared or keep == held or not keep:
                continue
            old = chunk.dram
            rows = [held.index(layer) for layer in keep]
            chunk.dram = old[rows].clone()  # a loader holding the old tensor still reads it whole
            if self._pin:
                chunk.dram = chunk.dram.pin_memory()
            chunk.held_layers = keep
            chunk.version += 1  # an SSD write of the old layers is stale
            index.dram_used += chunk.dram.nbytes - old.nbytes
            index.counters["window_chunks_trimmed"] += 1

    def _empty(self, capacity: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty((self.num_layers, 2, capacity, *like.shape[3:]), dtype=like.dtype, pin_memory=self._pin)

    # ------------------------------------------------------------------ making room

    def make_room(self, need: int, *, protect: Chunk | None = None, clean_only: bool = False,
                  window_too: bool = True, exclude: str | None = None) -> bool:
        """Evict DRAM chunks (writing dirty ones back to SSD first) until ``need`` more bytes fit.

        Called without the lock; returns False if not enough can go.
        """
        index = self.index
        for _ in range(100000):
            with index.lock:
                if index.dram_used + need <= index.dram_bytes:
                    return True
                victim = self._victim_locked(protect, clean_only, window_too, exclude)
                if victim is None:
                    return False
                entry, chunk = victim
                if not chunk.dirty or self.ssd.dir is None:
                    self.evict_chunk_locked(entry, chunk)
                    continue
            ok = self.ssd.write_chunk(entry, chunk)  # outside the lock: a file write takes a while
            with index.lock:
                if chunk.dram is not None and index.live_locked(chunk) and (ok or chunk.dirty):
                    self.evict_chunk_locked(entry, chunk)
        return False

    def _victim_locked(self, protect: Chunk | None, clean_only: bool, window_too: bool,
                       exclude: str | None) -> tuple[SessionEntry, Chunk] | None:
        index = self.index
        order = eviction_order(index.entries.values(), policy=index.policy, window=index.window,
                               pinned=index.pinned_locked(), exclude={exclude} if exclude else set())
        for shared_too in (False, True):  # what several sessions share is worth more: it goes last
            for entry in order:
                if not window_too and entry.key in index.window:
                    continue
                for chunk in reversed(entry.chunks):  # the tail first: the head is what the next turn needs first
                    if (chunk.dram is None or chunk is protect or (clean_only and chunk.dirty)
                            or (chunk.shared and not shared_too)
                            or (exclude is not None and exclude in chunk.owners)):
                        continue
                    return entry, chunk
        return None

    def evict_chunk_locked(self, entry: SessionEntry, chunk: Chunk) -> None:
        index = self.index
        lost = chunk.dirty
        index.dram_used -= chunk.dram_bytes
        chunk.dram = None
        chunk.prefetched = False
        index.counters["evictions_dram"] += 1
        if lost:  # no SSD copy: the sessions holding it end where this chunk began
            index.counters["chunks_lost_dram"] += 1
            for key in list(chunk.owners):
                owner = index.entries.get(key)
                if owner is not None:
                    index.cut_locked(owner, chunk.start)
