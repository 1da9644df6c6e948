"""Block-quantized weights: the two formats, quantization from float, and the PyTorch reference of their matmul.

A weight W [N, K] is stored in blocks of 32 values along K (K a multiple of 32):

- ``int8``: ``qs`` int8 [N, K] and one float16 scale ``d`` per block [N, K/32]: w = d * q, q in -127..127.
  The layout of GGUF's Q8_0, split into two arrays.
- ``int4``: ``qs`` uint8 [N, K/2] (byte j of a block: element j in the low nibble, element j + 16 in the
  high one), a float16 scale ``d`` and offset ``m`` per block: w = d * q + m, q in 0..15. GGUF's Q4_1
  layout; Q4_0 (w = d * (q - 8)) is the case m = -8 d, and Q4_K's 32-value sub-blocks map onto it too.

The matmul quantizes its input rows per block of 32 as well (int8 with a float scale, round half to even),
so that each block's dot product is integer arithmetic; `reference_linear` is that computation in PyTorch,
the oracle of the C++ kernel (strata/kernels/csrc_cpu/quant_linear.cpp) and the path wherever the kernel is
missing (a GPU without its kernel, a machine without a compiler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
FORMATS = ("int8", "int4")


@dataclass(frozen=True)
class QuantizedWeight:
    """W [out_features, in_features] in one of FORMATS; `m` is None for int8."""

    format: str
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads: what decode streams from memory for this weight."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def to(self, device: torch.device) -> QuantizedWeight:
        m = self.m.to(device) if self.m is not None else None
        return QuantizedWeight(self.format, self.qs.to(device), self.d.to(device), m)

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight's rows (output features) `index`, e.g. an embedding lookup's token ids."""
        m = self.m[index] if self.m is not None else None
        return QuantizedWeight(self.format, self.qs[index], self.d[index], m)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        scale = self.d.float().unsqueeze(-1)
        if self.format == "int8":
            w = self.qs.view(n, k // BLOCK, BLOCK).float() * scale
        else:
            w = unpack_int4(self.qs).view(n, k // BLOCK, BLOCK).float() * scale
            assert self.m is not None
            w = w + self.m.float().unsqueeze(-1)
        return w.view(n, k).to(dtype)


@dataclass(frozen=True)
class PackedWeight:
    """A QuantizedWeight [n, K] repacked once for the CPU kernel (strata/kernels/csrc_cpu/linear.cpp):
    `data` uint8 [groups of 8 columns, K/32, record bytes]."""

    format: str
    data: torch.Tensor
    n: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.data.shape[1] * BLOCK


def concat(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack along the output features (fused q/k/v or gate/up projections)."""
    fmt = weights[0].format
    if any(w.format != fmt for w in weights):
        raise ValueError("cannot fuse weights of different formats")
    m = torch.cat([w.m for w in weights]) if fmt == "int4" else None  # type: ignore[misc]
    return QuantizedWeight(fmt, torch.cat([w.qs for w in weights]), torch.cat([w.d for w in weights]), m)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [..., K] (values 0..15) -> [..., K/2] in the block layout above."""
    blocks = q.view(*q.shape[:-1], -1, BLOCK)
    packed = blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2 :] << 4)
    return packed.reshape(*q.shape[:-1], q.shape[-1] // 2).contiguous()


def unpack_int4(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [..., K/2] -> uint8 [..., K]."""
    blocks = qs.view(*qs.shape[:-1], -1, BLOCK // 2)
    q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1)
    return q.reshape(*qs.shape[:-1], qs.shape[-1] * 2)


def quantizable(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % BLOCK == 0


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Round-to-nearest quantization of a float weight [N, K] (K a multiple of 32), block by block:
    int8 symmetric (scale max|w| / 127), int4 asymmetric (scale (max - min) / 15, offset min)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; expected one of {FORMATS}")
    if not quantizable(weight):
        raise ValueError(f"a weight of shape {tuple(weight.shape)} has no whole blocks of {BLOCK}")
    n, k = weight.shape
    blocks = weight.float().view(n, k // BLOCK, BLOCK)
    if fmt == "int8":
        d = (blocks.abs().amax(-1) / 127).half()
        inv = _inverse(d.float())
        q = torch.round(blocks * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", q.view(n, k).contiguous(), d.contiguous())
    low, high = blocks.amin(-1), blocks.amax(-1)
    d, m = ((high - low) / 15).half(), low.half()
    inv = _inverse(d.float())
    q = torch.round((blocks - m.float().unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight("int4", pack_int4(q.view(n, k)), d.contiguous(), m.contiguous())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d > 0, 1 / d, torch.zeros_like(d))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [M, K] -> (q [M, K/32, 32] as float holding integers -127..127, scales [M, K/32]), as the kernel."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    d = blocks.abs().amax(-1) / 127
    return torch.round(blocks * _inverse(d).unsqueeze(-1)), d


def reference_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) computed as the kernel does: int8 input blocks against the weight's blocks."""
    n, k = weight.shape
    rows = x.reshape(-1, k)
    qx, dx = quantize_activations(rows)
    qw = (weight.qs if weight.format == "int8" else unpack_int4(weight.qs)).view(n, k // BLOCK, BLOCK).float()
    d = weight.d.float()
    y = torch.zeros(rows.shape[0], n, device=x.device)
    for b in range(k // BLOCK):
        # The block's integer dot products (exact in float32: |sum| <= 32 * 127 * 127), then its two scales.
        y += (qx[:, b] @ qw[:, b].T) * (dx[:, b, None] * d[None, :, b])
    if weight.m is not None:
        y = y + (qx.sum(-1) * dx) @ weight.m.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)
