"""How the session tiers (DRAM, SSD, the shared tier) store KV: ``--kv-tier-dtype``.

- ``model``: the model's dtype, as the device pool holds it (no loss).
- ``int8`` (the default): each token's K (or V) row of one head, ``head_dim`` values, turned by a normalized
  Hadamard transform (it spreads a few outlier channels over the whole row, so one scale fits the row), then
  int8 codes round(x / s) with s = absmax / 127, and s beside them (float32): head_dim + 4 bytes a row
  (llama.cpp's q8_0 with one block per head row, rotated as llama.cpp's rotated KV). Without the rotation
  Gemma 3's keys lost a conversation in six of the quality gate; with it none (docs/kv-compression.md).
- ``fp8``: the row divided by s = absmax / 448 in float8 e4m3 (vLLM's fp8 KV, with a scale per row):
  head_dim + 4 bytes.
- ``int4``: the row turned by the same Hadamard transform, then codes in [-8, 7] with s = absmax / 7, two per
  byte: head_dim / 2 + 4 bytes.

A compressed row is packed into bytes, so the tiers keep their one layout [layers, 2, tokens, kv_heads,
row] (uint8 instead of the model dtype): chunks slice, grow, trim and write to files as before, their CRCs
and HMACs cover the compressed bytes, and only ``encode`` (the saver thread, before a save reaches DRAM) and
``decode`` (the loader, one layer at a time) see the codes.
"""

from __future__ import annotations

import math

import torch

FORMATS = ("model", "int8", "fp8", "int4")
DEFAULT_FORMAT = "int8"  # passes the quality gate on every model measured (docs/kv-compression.md)
ROTATED = ("int8", "int4")
_SCALE_BYTES = 4  # one float32 per row


class KVCodec:
    def __init__(self, name: str, dtype: torch.dtype, head_dim: int) -> None:
        if name not in FORMATS:
            raise ValueError(f"unknown KV tier format {name!r}; expected one of {FORMATS}")
        if name == "int4" and head_dim % 2:
            raise ValueError(f"int4 KV needs an even head_dim, not {head_dim}")
        self.name = name
        self.dtype = dtype  # what decode returns: the model's dtype
        self.head_dim = head_dim
        self.packed = name != "model"
        self.storage_dtype = torch.uint8 if self.packed else dtype
        code_bytes = head_dim // 2 if name == "int4" else head_dim
        self.width = code_bytes + _SCALE_BYTES if self.packed else head_dim  # elements of one stored row
        # One rotation per block of the largest power of two dividing head_dim (the whole row for 64, 128, 256;
        # blocks of 32 for Phi-3's 96).
        self._block = head_dim & -head_dim
        self._hadamard = _hadamard(self._block) if name in ROTATED else None

    @property
    def row_bytes(self) -> int:
        return self.width * torch.empty(0, dtype=self.storage_dtype).element_size()

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """[..., head_dim] in the model dtype -> [..., width] as stored."""
        if not self.packed:
            return kv
        x = self._rotate(kv.float())
        amax = x.abs().amax(dim=-1, keepdim=True)
        if self.name == "int8":
            scale = amax / 127
            codes = torch.round(x / _nonzero(scale)).clamp(-127, 127).to(torch.int8).view(torch.uint8)
        elif self.name == "fp8":
            scale = amax / 448
            codes = (x / _nonzero(scale)).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        else:
            scale = amax / 7
            q = (torch.round(x / _nonzero(scale)).clamp(-8, 7) + 8).to(torch.uint8)
            codes = q[..., 0::2] | (q[..., 1::2] << 4)
        return torch.cat([codes, scale.contiguous().view(torch.uint8)], dim=-1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """[..., width] as stored -> [..., head_dim] in the model dtype."""
        if not self.packed:
            return rows
        codes, scale = rows[..., :-_SCALE_BYTES], rows[..., -_SCALE_BYTES:].contiguous().view(torch.float32)
        if self.name == "int8":
            x = codes.contiguous().view(torch.int8).float() * scale
        elif self.name == "fp8":
            x = codes.contiguous().view(torch.float8_e4m3fn).float() * scale
        else:
            low, high = (codes & 0xF).float() - 8, (codes >> 4).float() - 8
            x = torch.stack([low, high], dim=-1).flatten(-2) * scale
        return self._rotate(x).to(self.dtype)  # the rotation is orthonormal and symmetric: its own inverse

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self._hadamard is None:
            return x
        return (x.unflatten(-1, (-1, self._block)) @ self._hadamard).flatten(-2)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row encodes as zeros


def _hadamard(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix scaled to be orthonormal (Sylvester's construction)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)
