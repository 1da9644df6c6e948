"""The device KV block pool: one tensor of blocks and a free list.

A block holds one layer's K and V for `block_size` tokens, so a sequence takes blocks only at
the layers where it stores KV (a request that skips attention at a layer takes none there).
Every layer's attention reads the same tensor through its own block table (see BlockTable).
It lives on STRATA_DEVICE unless given a device (see strata.kernels.device).
"""

from __future__ import annotations

from collections import deque

import torch

from strata.kernels.device import default_device


class BlockPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        windows: tuple[int | None, ...] | None = None,
    ) -> None:
        """`windows`: per layer, its sliding window (None: full attention); a windowed layer's blocks that no
        later token reads go back to the pool while a sequence runs (BlockTable.drop_outside_windows)."""
        if num_blocks < num_layers:
            raise ValueError("the KV cache holds less than one block per layer: raise --kv-cache-gb")
        self.num_layers = num_layers
        self.windows = windows if windows is not None and any(w is not None for w in windows) else None
        self.block_size = block_size
        self.num_blocks = num_blocks
        # [K/V, blocks, block_size, kv_heads, head_dim]: K and V are each one slab of blocks.
        self.kv = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device if device is not None else default_device())
        # The same memory indexed by slot (block * block_size + offset): [K/V, slots, kv_heads, head_dim].
        self.slots_view = self.kv.view(2, num_blocks * block_size, num_kv_heads, head_dim)
        self._free: deque[int] = deque(range(num_blocks))

    @staticmethod
    def bytes_per_block(num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        """One block: one layer's K and V for block_size tokens."""
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * block_size * num_kv_heads * head_dim * elem

    @property
    def block_bytes(self) -> int:
        return self.kv[:, 0].numel() * self.kv.element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens at one layer."""
        return -(-num_tokens // self.block_size)

    def dead_blocks(self, layer: int, num_tokens: int) -> int:
        """Leading blocks of `layer` that no token from num_tokens on reads (0 unless it is windowed: a token
        at position p reads keys after p - window)."""
        window = self._window(layer)
        return max(0, num_tokens - window + 1) // self.block_size if window else 0

    def blocks_for_history(self, num_tokens: int) -> int:
        """Blocks, over all layers, of a history of num_tokens tokens that the next token continues from."""
        want = self.blocks_for(num_tokens)
        return sum(want - self.dead_blocks(layer, num_tokens) for layer in range(self.num_layers))

    def blocks_for_sequence(self, num_tokens: int, step_tokens: int) -> int:
        """The most blocks, over all layers, a sequence of num_tokens tokens holds at once when a step
        computes at most step_tokens of them (a windowed layer holds its window and the step's tokens)."""
        want = self.blocks_for(num_tokens)
        return sum(min(want, self.blocks_for(w + step_tokens) + 1) if (w := self._window(layer)) else want
                   for layer in range(self.num_layers))

    def _window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows is not None else None

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def _index(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of slots_view that broadcast to [layers, 2, n]: one gather yields the layer-major copy."""
        return torch.arange(2, device=self.kv.device)[None, :, None], slots.to(self.kv.device)[:, None, :]

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """A copy of the K/V at `slots` ([layers, n], one row of slots per layer): [layers, 2, n, heads, dim]."""
        return self.slots_view[self._index(slots)]

    def write(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """The inverse of read(): kv [layers, 2, n, heads, dim] into `slots` [layers, n]."""
        self.slots_view[self._index(slots)] = kv.to(self.kv.device)
