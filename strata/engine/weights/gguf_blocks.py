"""GGUF tensors taken block for block into strata's quantized formats, where the layouts map exactly.

- Q8_0 (fp16 d, 32 x int8)                         -> int8: the same numbers.
- Q4_1 (fp16 d, fp16 m, 16 bytes of nibbles)        -> int4: the same numbers and nibble order.
- Q4_0 (fp16 d, 16 bytes of nibbles, w = d (q - 8)) -> int4 with m = -8 d (exact in float16).
- Q4_K (256-value super-blocks: fp16 d, dmin, eight 6-bit sub-scales and sub-mins, w = d sc q - dmin mn)
                                                    -> int4 per 32-value sub-block: d = d sc, m = -dmin mn,
                                                       rounded once to float16 (2^-11 relative).
Other GGUF types are not mapped: those weights are quantized from their float values instead.
Rows of llama.cpp's permuted q/k projections are put back in the Hugging Face order, as the float
conversion (strata.engine.weights.gguf_convert) does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from strata.engine.weights.gguf_convert import gguf_field, hf_name, unpermute
from strata.kernels.quantized import BLOCK, QuantizedWeight, pack_int4

FORMAT_OF = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4"}


def read_blocks(gguf_path: Path, wanted: dict[str, str]) -> dict[str, QuantizedWeight]:
    """The weights of `wanted` (Hugging Face name -> format) whose GGUF blocks map onto that format exactly."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    arch = gguf_field(reader, "general.architecture")
    heads = int(gguf_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(gguf_field(reader, f"{arch}.attention.head_count_kv", heads))
    out: dict[str, QuantizedWeight] = {}
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        fmt = wanted.get(name) if name is not None else None
        kind = t.tensor_type.name
        if fmt is None or FORMAT_OF.get(kind) != fmt:
            continue
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, -1)
        weight = _DECODE[kind](raw)
        # llama.cpp permutes q/k of Llama-arch files only (as gguf_convert undoes)
        if arch in ("llama", "mistral") and t.name.endswith("attn_q.weight"):
            weight = _permute_rows(weight, heads)
        elif arch in ("llama", "mistral") and t.name.endswith("attn_k.weight"):
            weight = _permute_rows(weight, kv_heads)
        out[name] = weight  # type: ignore[index]
    return out


def _halves(raw: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of every block: [rows, blocks]."""
    return np.ascontiguousarray(raw[..., offset : offset + 2]).view(np.float16)[..., 0]


def _blocks(raw: np.ndarray, size: int) -> np.ndarray:
    return raw.reshape(raw.shape[0], -1, size)


def _q8_0(raw: np.ndarray) -> QuantizedWeight:
    b = _blocks(raw, 2 + BLOCK)
    d = _halves(b, 0)
    qs = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(raw.shape[0], -1)
    return QuantizedWeight("int8", torch.from_numpy(qs.copy()), torch.from_numpy(d.copy()))


def _q4_1(raw: np.ndarray) -> QuantizedWeight:
    b = _blocks(raw, 4 + BLOCK // 2)
    d, m = _halves(b, 0), _halves(b, 2)
    qs = np.ascontiguousarray(b[..., 4:]).reshape(raw.shape[0], -1)
    return QuantizedWeight("int4", torch.from_numpy(qs.copy()), torch.from_numpy(d.copy()), torch.from_numpy(m.copy()))


def _q4_0(raw: np.ndarray) -> QuantizedWeight:
    b = _blocks(raw, 2 + BLOCK // 2)
    d = _halves(b, 0)
    m = (d.astype(np.float32) * -8).astype(np.float16)  # a power-of-two multiple: exact
    qs = np.ascontiguousarray(b[..., 2:]).reshape(raw.shape[0], -1)
    return QuantizedWeight("int4", torch.from_numpy(qs.copy()), torch.from_numpy(d.copy()), torch.from_numpy(m))


def _q4_k(raw: np.ndarray) -> QuantizedWeight:
    b = _blocks(raw, 144)  # d, dmin (fp16), scales[12], qs[128] per 256 values
    rows, supers = b.shape[0], b.shape[1]
    d = _halves(b, 0).astype(np.float32)
    dmin = _halves(b, 2).astype(np.float32)
    sc_bytes = b[..., 4:16].astype(np.uint8)
    scale, mins = np.empty((rows, supers, 8), np.float32), np.empty((rows, supers, 8), np.float32)
    for j in range(8):  # ggml's 6-bit packing of the eight sub-block scales and mins
        if j < 4:
            s, mn = sc_bytes[..., j] & 63, sc_bytes[..., j + 4] & 63
        else:
            s = (sc_bytes[..., j + 4] & 0x0F) | ((sc_bytes[..., j - 4] >> 6) << 4)
            mn = (sc_bytes[..., j + 4] >> 4) | ((sc_bytes[..., j] >> 6) << 4)
        scale[..., j], mins[..., j] = s, mn
    qs = b[..., 16:].reshape(rows, supers, 4, 32)  # four 64-value chunks: low nibbles, then high nibbles
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, supers * 256)
    packed = pack_int4(torch.from_numpy(np.ascontiguousarray(q)))
    d_sub = (d[..., None] * scale).astype(np.float16).reshape(rows, -1)
    m_sub = (-dmin[..., None] * mins).astype(np.float16).reshape(rows, -1)
    return QuantizedWeight("int4", packed, torch.from_numpy(d_sub), torch.from_numpy(m_sub))


_DECODE = {"Q8_0": _q8_0, "Q4_1": _q4_1, "Q4_0": _q4_0, "Q4_K": _q4_k}


def _permute_rows(w: QuantizedWeight, n_head: int) -> QuantizedWeight:
    rows = w.shape[0]
    order = torch.from_numpy(unpermute(np.arange(rows)[:, None], n_head)[:, 0].copy())
    return w.rows(order)

