"""Context-overflow truncation of a stored session: drop a token range, re-rotate the later keys.

Runs on the saver thread (behind the session's pending saves). The whole session is read (DRAM, else its
chunk files), rewritten without ``[keep_head, drop_end)`` by reencode.py, and stored again from token 0;
if the session changed meanwhile, nothing is replaced.
"""

from __future__ import annotations

import torch

from strata.storage.chunk_file import ChunkLayout
from strata.storage.dram_tier import DramTier
from strata.storage.load_handle import KVLoadError
from strata.storage.reencode import drop_and_reposition, drop_tokens
from strata.storage.session_index import SessionIndex
from strata.storage.ssd_tier import SsdTier


class Truncator:
    def __init__(self, index: SessionIndex, dram: DramTier, ssd: SsdTier, layout: ChunkLayout,
                 rope_inv_freq: torch.Tensor) -> None:
        self.index = index
        self.dram = dram
        self.ssd = ssd
        self.layout = layout
        self.rope_inv_freq = rope_inv_freq

    def apply(self, key: str, keep_head: int, drop_end: int) -> int:
        """Returns the tokens now stored. Raises KeyError (no session), ValueError (bad range) or
        KVLoadError (the session changed while it was being read)."""
        index = self.index
        with index.lock:
            entry = index.entries.get(key)
            if entry is None:
                raise KeyError(key)
            if not 0 <= keep_head <= drop_end <= len(entry.tokens):
                raise ValueError(f"bad drop range [{keep_head}, {drop_end}) of {len(entry.tokens)} tokens")
            old_tokens = list(entry.tokens)
            pieces = [(c, c.n, c.dram, c.ssd.path if c.dram is None and c.ssd else None) for c in entry.chunks]
            entry.active_loads += 1  # keeps its chunks from being evicted while read
        try:
            parts = [dram[:, :, :n] if dram is not None else self.ssd.read_chunk(chunk, path, n)
                     for chunk, n, dram, path in pieces]
        finally:
            with index.lock:
                entry.active_loads -= 1
        layout, codec = self.layout, self.layout.codec
        kv = codec.decode(torch.cat(parts, dim=2)) if parts else torch.empty(
            (layout.num_layers, 2, 0, layout.num_kv_heads, layout.head_dim), dtype=layout.dtype)
        # Rotated in the model dtype, stored again as the tiers store it.
        new_kv = codec.encode(drop_and_reposition(kv, keep_head, drop_end, self.rope_inv_freq))
        new_tokens = drop_tokens(old_tokens, keep_head, drop_end)
        with index.lock:
            if index.entries.get(key) is not entry or entry.tokens != old_tokens:
                raise KVLoadError(f"session {key!r} changed during truncation")
            private_from = entry.private_from
            index.cut_locked(entry, 0)
            # From the cut on its KV is re-encoded, not what the model computes for these tokens: its own.
            entry.private_from = keep_head if private_from is None else min(private_from, keep_head)
            entry.pending_saves += 1  # an empty entry must not expire before it is refilled
        try:
            self.dram.append(entry, new_tokens, 0, new_kv)
        finally:
            with index.lock:
                entry.pending_saves -= 1
        with index.lock:
            self.ssd.queue_writeback_locked(key)
            return len(entry.tokens)
