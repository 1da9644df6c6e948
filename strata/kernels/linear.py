"""A linear layer over a float weight (prepacked once for the CPU's matrix library) or a quantized one.

Plain `F.linear` on CPU reorders the weight into oneDNN's blocked layout on every call; a decode step
with a few rows spends much of its time there. Packing once at load time (torch's mkldnn linear, the
path inductor's freezing takes) makes the projections and the LM head up to 2x faster in bfloat16 and
float32 alike. Elsewhere (a GPU, a torch without mkldnn) it is `F.linear`. A block-quantized weight
(strata.kernels.quantized) is packed once for the CPU kernel where it runs (strata.kernels.ops.quantized_linear).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from strata.kernels.ops import pack_quantized, quantized_linear
from strata.kernels.quantized import PackedWeight, QuantizedWeight

log = logging.getLogger(__name__)

PACK_FOR_ROWS = 16  # oneDNN's batch-size hint; measured no worse than the unpacked path for 1 to 1024 rows


def _can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear:
    """y = x W^T + b for x [..., in_features]; W [out_features, in_features], float or block-quantized."""

    def __init__(self, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.quantized: QuantizedWeight | PackedWeight | None = None
        if isinstance(weight, QuantizedWeight):
            self.quantized = pack_quantized(weight) or weight  # the CPU kernel's layout where it runs
        self.weight: torch.Tensor | None = weight if isinstance(weight, torch.Tensor) else None
        # Bytes of weight one matmul reads: what a decode step streams from memory.
        self.nbytes = weight.nbytes if isinstance(weight, QuantizedWeight) else weight.numel() * weight.element_size()
        if self.weight is not None and _can_pack(self.weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.contiguous(), PACK_FOR_ROWS)
                self.weight = None  # the packed copy replaces it
            except RuntimeError as e:  # an unusual build: stay on F.linear
                log.warning("could not prepack a linear weight, using F.linear: %s", e)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return quantized_linear(x, self.quantized, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)
