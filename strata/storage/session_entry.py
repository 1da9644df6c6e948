"""In-memory index of one stored session: its token ids and the chunks that hold their KV.

A session is a list of chunks. Its whole chunks that any session of its tenant could compute the same way
are content chunks (named by their place in a hash chain, :mod:`.content_chain`) and may be shared: one
Chunk object, referenced by every session whose history starts with those tokens (``owners``). The rest
(a partial tail, and whatever follows KV re-encoded by a truncation) is the session's own.
"""

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
    held_layers: tuple[int, ...] | None = None  # the layers the file holds (None: all)


@dataclass(eq=False)  # compared and hashed by identity: one object may sit in several sessions
class Chunk:
    """A run of consecutive tokens of a session, in DRAM, on SSD, or both."""

    index: int
    start: int
    n: int = 0
    dram: torch.Tensor | None = None  # [layers, 2, capacity, kv_heads, row] as stored (kv_codec); [:, :, :n] valid
    ssd: SsdCopy | None = None
    version: int = 0  # bumped on every content change, so a racing SSD write can tell it is stale
    prefetched: bool = False
    digest: str | None = None  # a content chunk's address (whole, and pure KV of its tokens); None: private
    parent: str = ""  # the digest of the content chunk before it ("" for the first)
    scope: str = ""  # a content chunk's tenant
    tokens: list[int] | None = None  # a content chunk's token ids (a new session may copy the part it matches)
    owners: set[str] = field(default_factory=set)  # keys of the sessions whose lists hold it
    # The layers it holds (None: all): sliding-window layers no later token of its sessions reads are given
    # up (DramTier.trim_windows_locked); ``dram`` then holds only these rows, in order.
    held_layers: tuple[int, ...] | None = None

    def row(self, layer: int) -> int | None:
        """Where ``layer`` is in ``dram`` (None: not held)."""
        if self.held_layers is None:
            return layer
        return self.held_layers.index(layer) if layer in self.held_layers else None

    @property
    def shared(self) -> bool:
        return len(self.owners) > 1

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
                                          or self.ssd.valid_tokens < self.n
                                          or self.ssd.held_layers != self.held_layers)

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
    # Tokens from here on hold KV re-encoded by a truncation (or restored from the session's own files, whose
    # history is unknown): never content, so never shared. None: all of it is the plain model's KV.
    private_from: int | None = None
    manifest: Path | None = None  # its manifest file on SSD (the content chunks it references)
    refs_written: list[str] = field(default_factory=list)  # what that file lists

    def content_refs(self) -> list[str]:
        """Digests of its leading content chunks (what its manifest lists)."""
        refs = []
        for c in self.chunks:
            if c.digest is None:
                break
            refs.append(c.digest)
        return refs

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
