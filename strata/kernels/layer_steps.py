"""The element-wise steps of a decoder layer in PyTorch: the reference (and test oracle) of the fused C++ ones.

A decode step of a small model runs a few hundred of these, each a handful of PyTorch ops; the C++ kernels
(strata/kernels/csrc_cpu/fused_ops.cpp) do each in one pass. strata.kernels.ops picks the one that runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.kernels.paged_attention import write_kv
from strata.kernels.rotary import apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place: the residual stream), then rms_norm(x)."""
    x += delta
    return rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_qkv(
    qkv: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection [T, (heads + 2 kv_heads) * d] and rotate q and k by each row's position
    (cos_sin [positions, 2, d/2]): q [T, heads, d], k and v [T, kv_heads, d]."""
    t = qkv.shape[0]
    d = qkv.shape[1] // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    cos, sin = cos_sin[positions].unbind(1)
    return (apply_rotary(q.reshape(t, heads, d), cos, sin), apply_rotary(k.reshape(t, kv_heads, d), cos, sin),
            v.reshape(t, kv_heads, d))


def rotary_store_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """rotate_qkv, then k and v stored at `slots` of the caches (slot < 0: not stored); returns q."""
    q, k, v = rotate_qkv(qkv, cos_sin, positions, heads, k_cache.shape[2])
    keep = slots >= 0
    if not bool(keep.all()):
        k, v, slots = k[keep], v[keep], slots[keep]
    write_kv(k_cache, v_cache, k, v, slots)
    return q
