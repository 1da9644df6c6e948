"""One sequence's KV blocks: a list of pool blocks per layer.

At every layer the blocks hold a prefix of the sequence's tokens. A layer whose attention the
sequence stops computing (AdaSkip) is `stopped` at the token where it stopped: its list never
grows again and blocks past that token go back to the pool, so skipped layers hold no memory.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from strata.storage.block_pool import BlockPool


class BlockTable:
    def __init__(self, num_layers: int) -> None:
        self.layers: list[list[int]] = [[] for _ in range(num_layers)]
        self.stopped: dict[int, int] = {}  # layer -> tokens it holds KV for; it stores no more
        self._tensor: torch.Tensor | None = None  # tensor(), rebuilt after a change

    @classmethod
    def allocate(cls, pool: BlockPool, num_tokens: int) -> BlockTable:
        """Blocks for num_tokens tokens at every layer (the caller checked that enough are free)."""
        table = cls(pool.num_layers)
        table.grow(pool, num_tokens)
        return table

    @property
    def num_blocks(self) -> int:
        return sum(len(blocks) for blocks in self.layers)

    def blocks(self) -> list[int]:
        return [b for blocks in self.layers for b in blocks]

    def _growing(self, skip: Iterable[int]) -> list[int]:
        skip = set(skip) | set(self.stopped)
        return [layer for layer in range(len(self.layers)) if layer not in skip]

    def blocks_needed(self, pool: BlockPool, num_tokens: int, skip: Iterable[int] = ()) -> int:
        """Blocks to add so that every layer not stopped and not in `skip` holds num_tokens tokens."""
        want = pool.blocks_for(num_tokens)
        return sum(max(want - len(self.layers[layer]), 0) for layer in self._growing(skip))

    def grow(self, pool: BlockPool, num_tokens: int, skip: Iterable[int] = ()) -> None:
        want = pool.blocks_for(num_tokens)
        for layer in self._growing(skip):
            if len(self.layers[layer]) < want:
                self.layers[layer].extend(pool.allocate(want - len(self.layers[layer])))
                self._tensor = None

    def stop(self, pool: BlockPool, layer: int, num_tokens: int) -> None:
        """From token num_tokens on, `layer` stores no KV: its blocks past that token are freed."""
        if layer in self.stopped:
            return
        self.stopped[layer] = num_tokens
        keep = pool.blocks_for(num_tokens)
        pool.free(self.layers[layer][keep:])
        del self.layers[layer][keep:]
        self._tensor = None

    def cut(self, pool: BlockPool, num_tokens: int) -> BlockTable:
        """Keep num_tokens tokens at every layer (each must hold them), free the rest; returns self."""
        keep = pool.blocks_for(num_tokens)
        for blocks in self.layers:
            if len(blocks) < keep:
                raise ValueError(f"a layer holds {len(blocks)} blocks, {keep} are needed")
            pool.free(blocks[keep:])
            del blocks[keep:]
        self.stopped = {}
        self._tensor = None
        return self

    def release(self, pool: BlockPool) -> None:
        pool.free(self.blocks())
        self.layers = [[] for _ in self.layers]
        self.stopped = {}
        self._tensor = None

    def tensor(self) -> torch.Tensor:
        """[layers, max blocks], shorter layers padded with block 0 (never read: masked by length)."""
        if self._tensor is None:
            width = max(max((len(blocks) for blocks in self.layers), default=0), 1)
            self._tensor = torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in self.layers],
                                        dtype=torch.long)
        return self._tensor

    def slots(self, block_size: int, start: int, end: int) -> torch.Tensor:
        """Slots of tokens [start, end) at every layer: [layers, end - start]; -1 where a layer holds none."""
        if end - start == 1:  # a decode step: one token, built from the lists (a few tensor ops cost more)
            index, offset = divmod(start, block_size)
            return torch.tensor([[blocks[index] * block_size + offset if len(blocks) > index else -1]
                                 for blocks in self.layers])
        pos = torch.arange(start, end)
        index = pos // block_size
        table = self.tensor()  # some layer (layer 0 is never skipped) holds every token asked for
        held = torch.tensor([len(blocks) for blocks in self.layers])[:, None] > index[None, :]
        return torch.where(held, table[:, index] * block_size + pos % block_size, -1)
