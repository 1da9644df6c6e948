"""One function per op: a compiled kernel where one supports the inputs, the PyTorch reference otherwise.

On a GPU the CUDA extension runs where it supports the inputs (dtype, head size, alignment); on CPU the
C++ kernels (strata.kernels.cpu_ext) run decode attention, the block-quantized linear layers and the fused
element-wise steps of a layer. Anything else, or a machine where a kernel could not be built, runs the
reference: slower, never wrong.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from strata.kernels import cpu_ext, kv_copy, layer_steps, paged_attention, prefill_gpu, quantized
from strata.kernels.cuda_ext import extension
from strata.kernels.quantized import PackedWeight, QuantizedWeight

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_GEMV_MAX_ROWS = 8  # csrc/quant_linear.cu's kMaxRows
_NO_ROWS = torch.zeros(0, dtype=torch.long)  # the CPU attention kernel's row_seq: query row i reads table row i
DECODE_HEAD_DIMS = (64, 128, 256)  # instantiated in csrc/paged_attention.cu


def _ext(t: torch.Tensor) -> ModuleType | None:
    return extension() if t.is_cuda else None


def _cpu(t: torch.Tensor) -> ModuleType | None:
    """The C++ CPU kernels for a CPU tensor of a dtype they take, else None (called for every op: kept cheap)."""
    if t.is_cuda or t.dtype not in DTYPES:
        return None
    return cpu_ext.extension()


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
        log.info("decode attention, quantized linear layers and fused layer steps on CPU: %s",
                 "C++ kernels" if cpu_ext.loaded() else "PyTorch reference")
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
    window: int | None = None,
) -> torch.Tensor:
    """One query per sequence over its cached context: q [B, heads, d] -> [B, heads, d] (into `out` if given).

    ``window`` (a sliding-window layer: only its last ``window`` tokens) runs the PyTorch reference, which
    reads only the window; the fused kernels attend to the whole context."""
    if window is not None:
        result = paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                        window)
        return result if out is None else out.copy_(result)
    if (cpu := _cpu(q)) is not None:
        q = q.contiguous()
        result = out if out is not None and out.is_contiguous() else torch.empty_like(q)
        cpu.paged_attention(result, q, k_cache, v_cache, block_tables.contiguous(), _NO_ROWS,
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


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """Causal attention of n new queries over S = history + n keys (bottom-right aligned); ``window``: only
    the last ``window`` keys up to each query (a sliding-window layer)."""
    if not q.is_cuda or window is not None:
        return paged_attention.prefill_attention(q, k, v, scale, window)
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


def pack_quantized(weight: QuantizedWeight) -> PackedWeight | None:
    """`weight` in the CPU kernel's layout (done once, at load), or None where that kernel does not run."""
    if weight.device.type != "cpu" or (cpu := cpu_ext.extension()) is None:
        return None
    if weight.format == "int8":
        data = cpu.pack_int8(weight.qs, weight.d)
    else:
        data = cpu.pack_int4(weight.qs, weight.d, weight.m)
    return PackedWeight(weight.format, data, weight.shape[0])


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight | PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] W^T (+ bias) for a block-quantized W [N, K] (strata.kernels.quantized).

    A packed weight runs the CPU kernel, decode rows and prefill chunks alike; on a GPU the CUDA kernels; the
    reference anywhere else."""
    if isinstance(weight, QuantizedWeight):
        if (ext := _ext(x)) is not None and x.dtype in DTYPES:
            return _quantized_linear_gpu(ext, x, weight, bias)
        return quantized.reference_linear(x, weight, bias)
    cpu = cpu_ext.extension()
    assert cpu is not None, "a packed weight without the CPU kernels"
    return cpu.linear_packed(x, weight.data, weight.n, weight.format == "int4", bias)


def _quantized_linear_gpu(ext: ModuleType, x: torch.Tensor, weight: QuantizedWeight,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """On the GPU the weights are dequantized in registers and the activations keep their dtype: the warp-per-column
    kernel for up to 8 rows, else the weight dequantized once and the matrix library (its oracle is
    F.linear(x, weight.dequantize(x.dtype)))."""
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    if rows.shape[0] <= GPU_GEMV_MAX_ROWS:
        out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
        ext.quant_gemv(out, rows, weight.qs, weight.d, weight.m)
    else:
        w = torch.empty(n, k, dtype=x.dtype, device=x.device)
        ext.quant_dequantize(w, weight.qs, weight.d, weight.m)
        out = rows @ w.T
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if (cpu := _cpu(x)) is not None and x.dim() == 2:
        return cpu.rms_norm(x, weight, eps)
    return layer_steps.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (the residual stream), then rms_norm(x)."""
    if (cpu := _cpu(x)) is not None and x.dim() == 2 and x.is_contiguous():
        return cpu.add_rms_norm(x, delta, weight, eps)
    return layer_steps.add_rms_norm(x, delta, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if (cpu := _cpu(gate_up)) is not None and gate_up.dim() == 2:
        return cpu.silu_mul(gate_up)
    return layer_steps.silu_mul(gate_up)


def rotary_store_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """Rotate q and k of the fused projection, store k and v at `slots` (< 0: not stored); returns q."""
    if (cpu := _cpu(qkv)) is not None and qkv.dim() == 2:
        return cpu.rotary_store_kv(qkv, cos_sin, positions, slots, k_cache, v_cache, heads)
    if _ext(qkv) is not None:  # GPU: rotated in PyTorch, stored by the CUDA kernel (it skips slots < 0)
        q, k, v = layer_steps.rotate_qkv(qkv, cos_sin, positions, heads, k_cache.shape[2])
        write_kv(k_cache, v_cache, k, v, slots)
        return q
    return layer_steps.rotary_store_kv(qkv, cos_sin, positions, slots, k_cache, v_cache, heads)
