"""One sequence's KV blocks: a list of pool blocks per layer.

At every layer the blocks hold a prefix of the sequence's tokens. A layer whose attention the
sequence stops computing (AdaSkip) is `stopped` at the token where it stopped: its list never
grows again and blocks past that token go back to the pool, so skipped layers hold no memory.

A sliding-window layer (the pool's ``windows``) needs, for the tokens still to come, only the last
window - 1 tokens: its blocks before them go back to the pool (``drop_outside_windows``) and leave a hole
(NO_BLOCK) at the front of its list, so block i still holds tokens [i * block_size, (i + 1) * block_size).
Holes read as block 0 in ``tensor()`` (attention masks those positions) and as slot -1 in ``slots()``
(copies skip them). The table can then continue only from a token whose window it still holds
(``window_intact``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from strata.storage.block_pool import BlockPool

NO_BLOCK = -1  # a windowed layer's block that went back to the pool


class BlockTable:
    def __init__(self, num_layers: int) -> None:
        self.layers: list[list[int]] = [[] for _ in range(num_layers)]
        self.stopped: dict[int, int] = {}  # layer -> tokens it holds KV for; it stores no more
        self.dropped = [0] * num_layers  # per layer, its leading blocks given back (outside its window)
        self._tensor: torch.Tensor | None = None  # _table(), rebuilt after a change
        self._clamped: tuple[torch.Tensor, torch.Tensor] | None = None  # (_table(), tensor()) last built

    @classmethod
    def allocate(cls, pool: BlockPool, num_tokens: int) -> BlockTable:
        """Blocks for a history of num_tokens tokens that the next token continues from: every layer's, a
        windowed layer's only from its window on (the caller checked that pool.blocks_for_history are free)."""
        table = cls(pool.num_layers)
        want = pool.blocks_for(num_tokens)
        for layer in range(pool.num_layers):
            dead = pool.dead_blocks(layer, num_tokens)
            table.layers[layer] = [NO_BLOCK] * dead + pool.allocate(want - dead)
            table.dropped[layer] = dead
        return table

    @property
    def num_blocks(self) -> int:
        return sum(len(blocks) - dropped for blocks, dropped in zip(self.layers, self.dropped, strict=True))

    def blocks(self) -> list[int]:
        return [b for blocks in self.layers for b in blocks if b != NO_BLOCK]

    def drop_outside_windows(self, pool: BlockPool, num_tokens: int) -> int:
        """Give back the blocks of windowed layers that no token from `num_tokens` on reads (a token at
        position p reads keys after p - window); returns how many."""
        if pool.windows is None:
            return 0
        freed: list[int] = []
        for layer, blocks in enumerate(self.layers):
            dead = min(pool.dead_blocks(layer, num_tokens), len(blocks))
            for i in range(self.dropped[layer], dead):
                freed.append(blocks[i])
                blocks[i] = NO_BLOCK
            self.dropped[layer] = max(self.dropped[layer], dead)
        if freed:
            pool.free(freed)
            self._tensor = None
        return len(freed)

    def window_intact(self, pool: BlockPool, num_tokens: int) -> bool:
        """Whether every windowed layer still holds the window that a token at position num_tokens reads."""
        if pool.windows is None:
            return True
        return all(not dropped or dropped * pool.block_size <= num_tokens - window + 1
                   for window, dropped in zip(pool.windows, self.dropped, strict=True) if window)

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
        pool.free([b for b in self.layers[layer][keep:] if b != NO_BLOCK])
        del self.layers[layer][keep:]
        self.dropped[layer] = min(self.dropped[layer], keep)
        self._tensor = None

    def cut(self, pool: BlockPool, num_tokens: int) -> BlockTable:
        """Keep num_tokens tokens at every layer (each must hold them), free the rest; returns self."""
        keep = pool.blocks_for(num_tokens)
        for layer, blocks in enumerate(self.layers):
            if len(blocks) < keep:
                raise ValueError(f"a layer holds {len(blocks)} blocks, {keep} are needed")
            pool.free([b for b in blocks[keep:] if b != NO_BLOCK])
            del blocks[keep:]
            self.dropped[layer] = min(self.dropped[layer], keep)
        self.stopped = {}
        self._tensor = None
        return self

    def release(self, pool: BlockPool) -> None:
        pool.free(self.blocks())
        self.layers = [[] for _ in self.layers]
        self.dropped = [0] * len(self.layers)
        self.stopped = {}
        self._tensor = None

    def tensor(self) -> torch.Tensor:
        """[layers, max blocks], shorter layers padded with block 0 and holes read as block 0 (never read:
        masked by length or window)."""
        raw = self._table()
        if self._clamped is None or self._clamped[0] is not raw:
            self._clamped = (raw, raw.clamp(min=0) if any(self.dropped) else raw)
        return self._clamped[1]

    def _table(self) -> torch.Tensor:
        """As tensor(), holes left as NO_BLOCK."""
        if self._tensor is None:
            width = max(max((len(blocks) for blocks in self.layers), default=0), 1)
            self._tensor = torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in self.layers],
                                        dtype=torch.long)
        return self._tensor

    def slots(self, block_size: int, start: int, end: int) -> torch.Tensor:
        """Slots of tokens [start, end) at every layer: [layers, end - start]; -1 where a layer holds none
        (skipped, or outside its window)."""
        if end - start == 1:  # a decode step: one token, built from the lists (a few tensor ops cost more)
            index, offset = divmod(start, block_size)
            return torch.tensor([[blocks[index] * block_size + offset if len(blocks) > index
                                  and blocks[index] != NO_BLOCK else -1] for blocks in self.layers])
        pos = torch.arange(start, end)
        index = pos // block_size
        table = self._table()  # some layer (layer 0 is never skipped) holds every token asked for
        held = torch.tensor([len(blocks) for blocks in self.layers])[:, None] > index[None, :]
        blocks = table[:, index]
        return torch.where(held & (blocks != NO_BLOCK), blocks * block_size + pos % block_size, -1)
