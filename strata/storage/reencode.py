"""Positional re-encoding: drop a range of stored tokens and move the later keys to their new positions.

Keys are stored after RoPE at their absolute position. RoPE rotations compose,
R(p - delta) = R(-delta) R(p), so a kept key moved back by ``delta`` positions is
rotated by ``-delta``; values carry no position and stay as they are.
"""

from __future__ import annotations

import torch

from strata.kernels.rotary import rotate_keys


def drop_and_reposition(kv: torch.Tensor, keep_head: int, drop_end: int,
                        inv_freq: torch.Tensor) -> torch.Tensor:
    """kv: [layers, 2, T, kv_heads, head_dim] -> the same without tokens [keep_head, drop_end).

    Tokens after the gap keep their values; their keys are re-rotated by -(drop_end - keep_head).
    The rotation runs in float32 so low-precision caches lose no more than one rounding.
    """
    layers, _, total, heads, dim = kv.shape
    if not 0 <= keep_head <= drop_end <= total:
        raise ValueError(f"bad drop range [{keep_head}, {drop_end}) for {total} tokens")
    delta = drop_end - keep_head
    tail = kv[:, :, drop_end:]
    keys = tail[:, 0].reshape(-1, heads, dim).to(torch.float32)
    moved = rotate_keys(keys, -delta, inv_freq.to(torch.float64)).to(kv.dtype)
    new_tail = torch.stack([moved.view(layers, -1, heads, dim), tail[:, 1]], dim=1)
    return torch.cat([kv[:, :, :keep_head], new_tail], dim=2)


def drop_tokens(token_ids: list[int], keep_head: int, drop_end: int) -> list[int]:
    """The prompt side of the same truncation, so cache and text stay consistent."""
    return token_ids[:keep_head] + token_ids[drop_end:]
