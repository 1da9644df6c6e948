"""Attention over the paged KV cache: the PyTorch reference (CPU and test oracle).

Cache layout per layer: [num_blocks, block_size, kv_heads, head_dim]; a token's
slot is block_id * block_size + offset. The functions run on any device; the model
calls them through strata.kernels.ops, which uses the CUDA kernels on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store the K/V of new tokens ([T, kv_heads, head_dim]) at their slots ([T])."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """K or V of the tokens at `slots` (any shape), contiguous: [*slots.shape, kv_heads, head_dim]."""
    return cache.view(-1, *cache.shape[2:])[slots]


def block_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Slots of positions 0..length-1 of one sequence."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """Causal attention of n new queries over S = history + n keys (bottom-right aligned).

    q: [n, heads, d]; k, v: [S, kv_heads, d] -> [n, heads, d]. ``window``: a sliding-window layer's query
    sees only the last ``window`` keys up to itself (as transformers' sliding_window).
    """
    n, s = q.shape[0], k.shape[0]
    # 4-D [1, heads, tokens, d]: on CPU, 3-D inputs miss SDPA's fused kernel (several times slower).
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if n == s and (window is None or window >= s):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(diagonal=s - n)
        if window is not None:
            mask &= torch.ones_like(mask).triu(diagonal=s - n - window + 1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """One query per sequence over its whole cached context (a sliding-window layer's: its last ``window``
    tokens; only those are read).

    q: [B, heads, d]; block_tables: [B, max_blocks] (int64); context_lens: [B] -> [B, heads, d].
    """
    block_size = k_cache.shape[1]
    max_len = int(context_lens.max())
    first = 0 if window is None else max(0, int(context_lens.min()) - window)
    pos = torch.arange(first, max_len, device=q.device)
    slots = block_tables[:, pos // block_size] * block_size + pos % block_size
    k = gather_kv(k_cache, slots).transpose(1, 2)  # [B, kv_heads, L, d]
    v = gather_kv(v_cache, slots).transpose(1, 2)
    valid = pos.unsqueeze(0) < context_lens.unsqueeze(1)
    if window is not None:
        valid &= pos.unsqueeze(0) >= (context_lens - window).unsqueeze(1)
    mask = valid.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)
