"""Prefill attention on a GPU: flash-attn's kernel when the ``strata[cuda]`` extra is installed, else torch SDPA.

Same contract as the reference ``paged_attention.prefill_attention``: causal, bottom-right aligned (the
n new queries are the last n of the S keys), grouped-query heads. The backend is chosen once and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

log = logging.getLogger(__name__)

FLASH_DTYPES = (torch.float16, torch.bfloat16)


@cache
def _flash_attn() -> Callable[..., torch.Tensor] | None:
    try:
        import flash_attn
        from flash_attn import flash_attn_func
    except ImportError:
        log.info("prefill attention on GPU: torch SDPA (its flash backend for fp16/bf16; flash-attn not installed)")
        return None
    log.info("prefill attention on GPU: flash-attn %s for fp16/bf16, torch SDPA for fp32", flash_attn.__version__)
    return flash_attn_func


def describe() -> str:
    return "flash-attn" if _flash_attn() is not None else "torch SDPA"


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [n, heads, d]; k, v: [S, kv_heads, d] -> [n, heads, d]."""
    flash = _flash_attn()
    if flash is not None and q.dtype in FLASH_DTYPES:
        # flash-attn aligns the causal mask bottom-right when n < S and reads grouped heads natively.
        return flash(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), softmax_scale=scale, causal=True).squeeze(0)
    n, s = q.shape[0], k.shape[0]
    if q.dtype not in FLASH_DTYPES and k.shape[1] != q.shape[1]:
        # SDPA's fp32-capable fused kernel (memory-efficient) takes no grouped heads: expand them.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    gqa = kh.shape[1] != qh.shape[1]
    if n == s:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # a bias object, not a dense mask: keeps SDPA on a fused kernel
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(n, s), scale=scale,
                                             enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)
