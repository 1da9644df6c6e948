"""Loading a stored session into fresh device blocks, as the engine does: the storage tests' way to read it back."""

from __future__ import annotations

import torch

from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVStore


def load_kv(store: KVStore, key: str, n: int, ids: list[int] | None = None) -> torch.Tensor:
    """KV of the session's first n tokens [layers, 2, n, heads, dim], loaded layer by layer into zeroed blocks.

    ``ids``: the requesting sequence's token ids (the load checks them); by default the stored ones.
    """
    pool = store.pool
    bt = BlockTable.allocate(pool, n)
    s = bt.slots(pool.block_size, 0, n)
    pool.write(s, torch.zeros_like(pool.read(s)))
    try:
        handle = store.start_load(key, store.tokens(key) if ids is None else ids, n, bt)
        for layer in range(pool.num_layers):
            store.wait_layer(handle, layer, timeout=10)
        return pool.read(s)
    finally:
        bt.release(pool)
