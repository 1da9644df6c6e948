"""One function per op: a compiled kernel where one supports the inputs, the PyTorch reference otherwise.

On a GPU the CUDA extension runs where it supports the inputs (dtype, head size, alignment); on CPU the
C++ kernels (strata.kernels.cpu_ext) run decode attention. Anything else, or a machine where a kernel
could not be built, runs the reference: slower, never wrong.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from strata.kernels import cpu_ext, kv_copy, paged_attention, prefill_gpu
from strata.kernels.cuda_ext import extension

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DECODE_HEAD_DIMS = (64, 128, 256)  # instantiated in csrc/paged_attention.cu


def _ext(t: torch.Tensor) -> ModuleType | None:
    return extension() if t.is_cuda else None


def _rows_aligned(*tensors: torch.Tensor) -> bool:
    """16-byte vector access: base address and every stride but the last a multiple of 16 bytes."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def prepare(device: torch.device) -> None:
    """At start-up: build or load the kernels now (not inside the first request) and log the choices."""
    if device.type == "cpu":
        log.info("decode attention on CPU: %s", "C++ kernel" if cpu_ext.loaded() else "PyTorch reference")
        return
    if device.type != "cuda":
        return
    ext = extension()
    log.info("decode attention and KV copies on GPU: %s", "CUDA kernels" if ext is not None else "PyTorch reference")
    prefill_gpu.describe()


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store the K/V of new tokens ([T, kv_heads, head_dim]) at their slots ([T])."""
    ext = _ext(k_cache)
    if ext is None or k.dtype not in DTYPES or not _rows_aligned(k_cache, k, v):
        paged_attention.write_kv(k_cache, v_cache, k, v, slots)
        return
    ext.write_kv(k_cache, v_cache, k, v, slots.to(k_cache.device, torch.long).contiguous())


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence over its cached context: q [B, heads, d] -> [B, heads, d] (into `out` if given)."""
    if q.device.type == "cpu" and q.dtype in DTYPES and cpu_ext.loaded():
        q = q.contiguous()
        result = out if out is not None and out.is_contiguous() else torch.empty_like(q)
        rows = torch.arange(q.shape[0])
        torch.ops.strata_cpu.paged_attention(result, q, k_cache, v_cache, block_tables.contiguous(), rows,
                                             context_lens.contiguous(), float(scale))
        return result if out is None or result is out else out.copy_(result)
    ext = _ext(q)
    if (ext is None or q.dtype not in DTYPES or q.shape[-1] not in DECODE_HEAD_DIMS
            or not _rows_aligned(k_cache, v_cache) or k_cache.stride() != v_cache.stride()):
        result = paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
        return result if out is None else out.copy_(result)
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    ext.paged_decode_attention(out, q, k_cache, v_cache, block_tables.to(q.device, torch.long).contiguous(),
                               context_lens.to(q.device, torch.long).contiguous(), float(scale))
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of n new queries over S = history + n keys (bottom-right aligned)."""
    if not q.is_cuda:
        return paged_attention.prefill_attention(q, k, v, scale)
    return prefill_gpu.prefill_attention(q, k, v, scale)


def copy_kv_slots(
    dst: torch.Tensor, dst_slots: torch.Tensor | None, src: torch.Tensor, src_slots: torch.Tensor | None
) -> None:
    """dst[:, dst_slots] = src[:, src_slots] for one layer ([2, slots, kv_heads, head_dim]); None: rows 0..n-1.

    Between a GPU tensor and pinned host memory the kernel moves the rows over PCIe itself, in the
    caller's current stream (the storage tier's copy stream).
    """
    gpu = dst if dst.is_cuda else src
    ext = _ext(gpu)
    if ext is None or dst.dtype != src.dtype:
        kv_copy.copy_kv_slots(dst, dst_slots, src, src_slots)
        return
    if not (src.is_cuda or src.is_pinned()):
        src = src.to(gpu.device)  # pageable memory cannot be mapped; a plain (staged) copy first
    if (dst.is_cpu and not dst.is_pinned()) or not _rows_aligned(dst, src) or not _rows_contiguous(dst, src):
        kv_copy.copy_kv_slots(dst, dst_slots, src, src_slots)
        return
    ext.copy_kv_slots(dst, _index(dst_slots, gpu.device), src, _index(src_slots, gpu.device))


def _rows_contiguous(*tensors: torch.Tensor) -> bool:
    return all(t.dim() == 4 and t.stride(2) == t.shape[3] for t in tensors)


def _index(slots: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if slots is None else slots.to(device, torch.long).contiguous()
