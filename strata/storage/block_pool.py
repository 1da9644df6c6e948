"""The device KV block pool: one tensor holding every layer's paged K and V, and a free list.

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
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache holds no block: raise --kv-cache-gb")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # [layers, K/V, blocks, block_size, kv_heads, head_dim]: a layer's K or V is one contiguous slab.
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device if device is not None else default_device())
        self._free: deque[int] = deque(range(num_blocks))
        self.bytes_per_token_block = self.kv[:, :, 0].numel() * self.kv.element_size()

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * elem

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
