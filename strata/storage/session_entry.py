"""In-memory index of one stored session: its token ids and the chunks that hold their KV."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class SsdCopy:
    path: Path
    nbytes: int
    file_tokens: int  # tokens the file holds
    valid_tokens: int  # leading tokens of the file that still match the chunk (a cut-back lowers it)


@dataclass
class Chunk:
    """A run of consecutive tokens of a session, in DRAM, on SSD, or both."""

    index: int
    start: int
    n: int = 0
    dram: torch.Tensor | None = None  # [layers, 2, capacity, kv_heads, head_dim]; [:, :, :n] is valid
    ssd: SsdCopy | None = None
    version: int = 0  # bumped on every content change, so a racing SSD write can tell it is stale
    prefetched: bool = False

    @property
    def end(self) -> int:
        return self.start + self.n

    @property
    def on_ssd(self) -> bool:
        return self.ssd is not None and self.ssd.valid_tokens >= self.n

    @property
    def servable(self) -> bool:
        return self.dram is not None or self.on_ssd

    @property
    def dirty(self) -> bool:
        """DRAM holds what the SSD file does not (also after a cut-back: the file is then rewritten
        shorter, so a restart does not bring back the history the client edited away)."""
        return self.dram is not None and (self.ssd is None or self.ssd.file_tokens != self.n
                                          or self.ssd.valid_tokens < self.n)

    @property
    def dram_bytes(self) -> int:
        return 0 if self.dram is None else self.dram.nbytes


@dataclass
class SessionEntry:
    key: str
    file_stem: str
    tokens: list[int] = field(default_factory=list)  # only tokens whose KV save has completed
    chunks: list[Chunk] = field(default_factory=list)
    last_used: float = 0.0
    pending_saves: int = 0
    active_loads: int = 0
    from_remote: bool = False  # imported from the shared tier and not looked up since: its hit says "remote"
    created: float = field(default_factory=time.time)  # wall clock: a later deletion elsewhere outdates it
    remote_touched: float = 0.0  # monotonic time its shared copy's expiry was last pushed back

    def dram_bytes(self) -> int:
        return sum(c.dram_bytes for c in self.chunks)

    def ssd_bytes(self) -> int:
        return sum(c.ssd.nbytes for c in self.chunks if c.ssd is not None)

    def chunks_for(self, num_tokens: int) -> list[Chunk]:
        return [c for c in self.chunks if c.start < num_tokens]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case, at C speed
        return n
    diff = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(diff.argmax())
