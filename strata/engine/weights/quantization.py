"""`--quantization`: which linear weights are stored block-quantized, and where their blocks come from.

- ``none``: every weight in the model's dtype (the default).
- ``int8``: every linear layer and the LM head in int8 blocks (strata.kernels.quantized).
- ``int4``: the layers' linear weights in int4 blocks, the LM head in int8 (it is the most sensitive matrix,
  and GGUF files keep it at 6 or 8 bits for the same reason).

A tied LM head is the embedding table too: lookups then dequantize the rows they read. Norms, biases and
an untied embedding stay in the model's dtype (a step reads only a few rows of the embedding).

A weight whose GGUF tensor is stored in a layout that maps onto the format exactly (Q8_0 -> int8; Q4_0,
Q4_1, Q4_K -> int4) is taken block for block from the file, so serving a GGUF at its own quantization adds
no rounding of the weights; every other weight is quantized from its float values (round to nearest).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from strata.kernels.quantized import QuantizedWeight, concat, quantizable, quantize

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "int4")
HEAD_FORMAT = "int8"
_LAYER_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


class Weights:
    """A model's tensors by Hugging Face name: float tensors, and QuantizedWeight for quantized linears."""

    def __init__(self, tensors: dict[str, torch.Tensor | QuantizedWeight], quantization: str) -> None:
        self.tensors = tensors
        self.quantization = quantization

    def __getitem__(self, name: str) -> torch.Tensor | QuantizedWeight:
        return self.tensors[name]

    def tensor(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        assert isinstance(t, torch.Tensor), f"{name} is quantized"
        return t

    def cat(self, names: list[str]) -> torch.Tensor | QuantizedWeight:
        """The weights stacked along their output features (a fused projection)."""
        parts = [self.tensors[n] for n in names]
        if all(isinstance(p, QuantizedWeight) for p in parts):
            return concat(parts)  # type: ignore[arg-type]
        if all(isinstance(p, torch.Tensor) for p in parts):
            return torch.cat(parts)  # type: ignore[arg-type]
        raise ValueError(f"cannot fuse quantized and float weights: {names}")


def planned_formats(names: list[str], quantization: str, tied: bool) -> dict[str, str]:
    """The block format of each weight that `quantization` stores quantized."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS}")
    if quantization == "none":
        return {}
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    plan = {n: quantization for n in names if _LAYER_LINEAR.fullmatch(n)}
    if head in names:
        plan[head] = HEAD_FORMAT
    return plan


def load_weights(model_dir: Path, dtype: torch.dtype, device: torch.device, quantization: str,
                 gguf: Path | None, tied: bool,
                 layout: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Weights:
    """`layout` brings the checkpoint's tensors to the names and order the model reads, before quantizing."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    floats: dict[str, torch.Tensor] = {}
    for f in files:
        floats.update(load_file(str(f)))
    if layout is not None:
        floats = layout(floats)
    plan = {n: fmt for n, fmt in planned_formats(list(floats), quantization, tied).items()
            if quantizable(floats[n])}
    exact: dict[str, QuantizedWeight] = {}
    if plan and gguf is not None:
        from strata.engine.weights.gguf_blocks import read_blocks

        exact = read_blocks(gguf, plan)
    tensors: dict[str, torch.Tensor | QuantizedWeight] = {}
    for name, t in floats.items():
        if name in exact:
            tensors[name] = exact[name].to(device)
        elif name in plan:
            tensors[name] = quantize(t, plan[name]).to(device)
        else:
            tensors[name] = t.to(device=device, dtype=dtype)
    if plan:
        log.info("quantization %s: %d weights in int blocks (%d taken from the GGUF file as stored)",
                 quantization, len(plan), len(exact))
    return Weights(tensors, quantization)
