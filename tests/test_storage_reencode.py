"""Positional re-encoding of stored keys: RoPE composition, drop-and-reposition, KVStore.truncate."""

from __future__ import annotations

import pytest
import torch

from strata.kernels.rotary import apply_rotary, rope_cos_sin, rope_inv_freq, rotate_keys
from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVStore
from strata.storage.reencode import drop_and_reposition, drop_tokens

L, H, D, BS = 4, 2, 16, 16


def rope_at(raw: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """raw: [T, H, D] -> keys as the model stores them at ``positions``."""
    cs = rope_cos_sin(inv_freq, int(positions.max()) + 1, torch.float64)[positions]
    return apply_rotary(raw.to(torch.float64), cs[:, 0], cs[:, 1]).to(raw.dtype)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("delta", [1, 37, -20, 1000])
def test_rotate_keys_composes(scaling, delta):
    inv_freq = rope_inv_freq(D, 10000.0, scaling)
    raw = torch.randn(30, H, D, dtype=torch.float64)
    pos = torch.arange(25, 55)
    moved = rotate_keys(rope_at(raw, pos, inv_freq), delta, inv_freq)
    assert torch.allclose(moved, rope_at(raw, pos + delta, inv_freq), atol=1e-10)
    if delta != 0:  # the check has teeth: unrotated keys are far off
        assert not torch.allclose(rope_at(raw, pos, inv_freq), rope_at(raw, pos + delta, inv_freq), atol=1e-2)


def stored_kv(raw_k: torch.Tensor, values: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[L, T, H, D] raw keys and values -> [L, 2, T, H, D] as stored (keys roped at 0..T-1)."""
    pos = torch.arange(raw_k.shape[1])
    keys = torch.stack([rope_at(raw_k[layer], pos, inv_freq) for layer in range(raw_k.shape[0])])
    return torch.stack([keys, values], dim=1)


def test_drop_and_reposition_matches_encoding_at_new_positions():
    inv_freq = rope_inv_freq(D, 500000.0, None)
    raw_k, values = torch.randn(L, 100, H, D), torch.randn(L, 100, H, D)
    kv = stored_kv(raw_k, values, inv_freq)
    out = drop_and_reposition(kv, 10, 60, inv_freq)
    keep = torch.cat([torch.arange(10), torch.arange(60, 100)])
    expected = stored_kv(raw_k[:, keep], values[:, keep], inv_freq)  # as if computed at positions 0..49
    assert out.shape == (L, 2, 50, H, D)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out[:, :, :10], kv[:, :, :10])  # the head does not move
    assert torch.equal(out[:, 1], values[:, keep])  # values never change
    naive = torch.cat([kv[:, :, :10], kv[:, :, 60:]], dim=2)
    assert not torch.allclose(naive, expected, atol=1e-2)
    assert drop_tokens(list(range(100)), 10, 60) == list(range(10)) + list(range(60, 100))
    with pytest.raises(ValueError):
        drop_and_reposition(kv, 60, 10, inv_freq)


def test_drop_and_reposition_low_precision():
    inv_freq = rope_inv_freq(D, 10000.0, None)
    raw_k, values = torch.randn(L, 80, H, D), torch.randn(L, 80, H, D)
    kv = stored_kv(raw_k, values, inv_freq)
    out = drop_and_reposition(kv.to(torch.bfloat16), 4, 44, inv_freq)
    assert out.dtype == torch.bfloat16
    expected = drop_and_reposition(kv, 4, 44, inv_freq)
    assert torch.allclose(out.float(), expected, atol=0.05)


def test_store_truncate_re_rotates_and_persists(tmp_path):
    inv_freq = rope_inv_freq(D, 10000.0, None)
    pool = BlockPool(L, H, D, BS, L * 64, torch.float32)
    kwargs = dict(model_fingerprint="m", dram_bytes=1 << 20, ssd_dir=tmp_path / "ssd", ssd_bytes=1 << 22,
                  chunk_tokens=32, rope_inv_freq=inv_freq)
    store = KVStore(pool, **kwargs)
    raw_k, values = torch.randn(L, 120, H, D), torch.randn(L, 120, H, D)
    kv = stored_kv(raw_k, values, inv_freq)
    ids = list(range(1000, 1120))
    bt = BlockTable.allocate(pool, 120)
    pool.write(bt.slots(BS, 0, 120), kv)
    store.save("t:a", ids, bt, 0, 120)
    store.finish("t:a", ids)
    with pytest.raises(ValueError):
        store.truncate("t:a", 50, 10)
    assert store.truncate("t:a", 16, 76) == 60  # keep the "system prompt" and the latest 44 tokens
    new_ids = drop_tokens(ids, 16, 76)
    keep = torch.cat([torch.arange(16), torch.arange(76, 120)])
    expected = stored_kv(raw_k[:, keep], values[:, keep], inv_freq)
    store.close()
    store = KVStore(BlockPool(L, H, D, BS, L * 64, torch.float32), **kwargs)  # the truncation is durable
    assert store.lookup("t:a", new_ids + [5]) == (60, "ssd")
    pool = store.pool
    bt2 = BlockTable.allocate(pool, 60)
    handle = store.start_load("t:a", new_ids, 60, bt2)
    store.wait_layer(handle, L - 1, timeout=10)
    got = pool.read(bt2.slots(BS, 0, 60))
    assert torch.allclose(got, expected, atol=1e-5)
    store.close()
    plain = KVStore(pool, **{**kwargs, "rope_inv_freq": None})
    with pytest.raises(ValueError):
        plain.truncate("t:a", 0, 1)
    plain.close()
