"""Copying one layer's K and V rows between the block pool and host buffers: the PyTorch reference.

A layer is [2, slots, kv_heads, head_dim] (K and V); the pool's layer view and a DRAM chunk's layer
slice both have that shape. Used by the storage tiers to load and save session KV.
"""

from __future__ import annotations

import torch


def copy_kv_slots(
    dst: torch.Tensor, dst_slots: torch.Tensor | None, src: torch.Tensor, src_slots: torch.Tensor | None
) -> None:
    """dst[:, dst_slots] = src[:, src_slots]; a missing index means rows 0..n-1.

    n is the length of the given index (of dst_slots first), else src's row count.
    """
    n = len(dst_slots) if dst_slots is not None else len(src_slots) if src_slots is not None else src.shape[1]
    rows = src[:, :n] if src_slots is None else src.index_select(1, src_slots.to(src.device))
    rows = rows.to(dst.device)
    if dst_slots is None:
        dst[:, :n].copy_(rows)
    else:
        dst.index_copy_(1, dst_slots.to(dst.device), rows)
