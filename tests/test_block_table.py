"""BlockTable over a real BlockPool: per-layer growth, stopped layers, cuts, slots."""

from __future__ import annotations

import pytest
import torch

from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable

L, BS = 3, 4


def test_layers_grow_stop_and_cut_without_leaking_blocks():
    pool = BlockPool(L, 1, 8, BS, 30, torch.float32)
    table = BlockTable(L)
    assert table.blocks_needed(pool, 10, skip={1}) == 2 * 3
    table.grow(pool, 10, skip={1})
    assert [len(b) for b in table.layers] == [3, 0, 3] and pool.num_used == 6
    slots = table.slots(BS, 0, 10)
    assert slots.shape == (L, 10) and bool((slots[1] == -1).all()) and bool((slots[[0, 2]] >= 0).all())
    assert len(set(slots[[0, 2]].flatten().tolist())) == 20  # layers never share a slot
    table.grow(pool, 10)  # layer 1 catches up when no longer skipped
    table.stop(pool, 2, 5)  # layer 2 stores nothing from token 5 on
    assert [len(b) for b in table.layers] == [3, 3, 2] and pool.num_used == 8
    table.grow(pool, 14)
    assert [len(b) for b in table.layers] == [4, 4, 2]  # a stopped layer never grows again
    with pytest.raises(ValueError):
        table.cut(pool, 14)  # layer 2 does not hold 14 tokens
    table.cut(pool, 5)
    assert [len(b) for b in table.layers] == [2, 2, 2] and pool.num_used == 6 and not table.stopped
    table.release(pool)
    assert pool.num_used == 0 and table.num_blocks == 0


def test_read_write_round_trip_through_slots():
    pool = BlockPool(L, 2, 8, BS, 3 * 8, torch.float32)
    table = BlockTable.allocate(pool, 13)
    kv = torch.randn(L, 2, 13, 2, 8)
    pool.write(table.slots(BS, 0, 13), kv)
    assert torch.equal(pool.read(table.slots(BS, 0, 13)), kv)
    assert torch.equal(pool.read(table.slots(BS, 5, 9)), kv[:, :, 5:9])
    assert int(pool.kv.ne(0).sum()) == kv.numel()  # nothing else was touched
