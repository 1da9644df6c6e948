"""Rotary position embedding (half-split layout, as Hugging Face Llama).

Lives in kernels because both the model (engine) and positional re-encoding of
stored keys (storage) use it.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, rotary_dim: int | None = None,
                  long_context: bool = False) -> torch.Tensor:
    """[head_dim // 2] rotation frequencies. With partial rotary (``rotary_dim`` < head_dim) only the first
    rotary_dim // 2 pairs turn, the rest have frequency 0 (the model lays each head out so that those are
    the pairs that pass through unrotated, see models/layouts.py). ``long_context`` picks LongRoPE's long
    factors."""
    dim = rotary_dim or head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    inv_freq = _scaled(inv_freq, scaling, long_context)
    return torch.cat([inv_freq, torch.zeros((head_dim - dim) // 2, dtype=torch.float64)])


def _scaled(inv_freq: torch.Tensor, scaling: dict[str, Any] | None, long_context: bool) -> torch.Tensor:
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "longrope":  # Phi-3/Phi-4: one factor per frequency, long or short by the context served
        ext = torch.tensor(scaling["long_factor" if long_context else "short_factor"], dtype=torch.float64)
        if ext.numel() != inv_freq.numel():
            raise ValueError(f"longrope has {ext.numel()} factors for {inv_freq.numel()} frequencies")
        return inv_freq / ext
    if kind == "frequency_factors":  # a GGUF file's rope_freqs: llama.cpp's llama3 scaling, one divisor per pair
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)
    if kind in (None, "default"):
        return inv_freq
    raise ValueError(f"unsupported rope scaling {kind!r}")


def rope_attention_factor(scaling: dict[str, Any] | None, max_positions: int) -> float:
    """How much LongRoPE scales cos and sin (the rotated dims of q and k); 1 for every other rope."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = float(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or max_positions / original)
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype,
                 attention_factor: float = 1.0) -> torch.Tensor:
    """[max_positions, 2, head_dim // 2]: cos and sin per position (pairs with frequency 0 stay 1 and 0)."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    scale = torch.where(inv_freq > 0, attention_factor, 1.0).to(torch.float64)
    return torch.stack([angles.cos() * scale, angles.sin() * scale], dim=1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim // 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rotate_keys(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move keys stored at position p to p + delta: R(p + delta) = R(delta) R(p)."""
    angle = (inv_freq * float(delta)).to(torch.float64)
    cos = angle.cos().to(keys.dtype).expand(keys.shape[0], -1)
    sin = angle.sin().to(keys.dtype).expand(keys.shape[0], -1)
    return apply_rotary(keys, cos, sin)
