"""The HBM tier: device blocks of finished requests, kept per session until the pool needs them.

A finished request's blocks stay here under its session key; the next turn of the
session takes them over (an HBM hit) instead of loading or recomputing. Because the
DRAM/SSD tiers are saved continuously, dropping an entry to make room is a drop, not
a copy. Requests without a session key are kept under a key made from their first
block of tokens (and their tenant), and only whole blocks of a common prefix are reused from them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.session_entry import common_prefix


@dataclass
class CachedBlocks:
    token_ids: list[int]  # tokens whose K/V the blocks hold at every layer, from position 0
    blocks: BlockTable


class DeviceCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._entries: OrderedDict[str, CachedBlocks] = OrderedDict()  # least recently used first
        self.evicted_entries = 0

    @property
    def num_blocks(self) -> int:
        return sum(e.blocks.num_blocks for e in self._entries.values())

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def tokens(self, key: str) -> int:
        entry = self._entries.get(key)
        return len(entry.token_ids) if entry else 0

    def put(self, key: str, token_ids: list[int], blocks: BlockTable, whole_blocks_only: bool = False) -> None:
        """Keep a finished sequence's blocks (it gives them up); blocks past its tokens go back to the pool."""
        self.drop(key)
        if whole_blocks_only:
            token_ids = token_ids[: len(token_ids) // self.pool.block_size * self.pool.block_size]
        blocks.cut(self.pool, len(token_ids))
        if token_ids:
            self._entries[key] = CachedBlocks(list(token_ids), blocks)

    def take(self, key: str, prompt_ids: list[int], whole_blocks_only: bool = False) -> tuple[int, BlockTable]:
        """Hand a session's blocks to its next request: (reused tokens, blocks holding them).

        At most len(prompt) - 1 tokens are reused, so the last prompt token is always computed
        and yields the logits of the first new token.
        """
        entry = self._entries.pop(key, None)
        if entry is None:
            return 0, BlockTable(self.pool.num_layers)
        n = min(common_prefix(entry.token_ids, prompt_ids), len(prompt_ids) - 1)
        if whole_blocks_only:
            n = n // self.pool.block_size * self.pool.block_size
        if not entry.blocks.window_intact(self.pool, n):  # an edit reaches back past a window given back
            entry.blocks.release(self.pool)
            return 0, BlockTable(self.pool.num_layers)
        return n, entry.blocks.cut(self.pool, n)

    def drop(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.blocks.release(self.pool)
        return entry is not None

    def evict(self, blocks_needed: int, protect: set[str] | frozenset[str] = frozenset()) -> bool:
        """Free cached entries, least recently used first (protected ones last), until enough blocks are free."""
        order = [k for k in self._entries if k not in protect] + [k for k in self._entries if k in protect]
        for key in order:
            if self.pool.num_free >= blocks_needed:
                break
            self.drop(key)
            self.evicted_entries += 1
        return self.pool.num_free >= blocks_needed
