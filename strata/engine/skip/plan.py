"""Build the per-row SkipPlan of one batched forward from each request's SkipSet."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strata.engine.models.attention_batch import LayerSkip, SkipPlan
from strata.engine.skip.skip_set import SkipSet


def build_skip_plan(
    num_rows: int,
    num_layers: int,
    groups: Sequence[tuple[torch.Tensor, SkipSet | None]],
    measure_rows: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> SkipPlan | None:
    """groups: (rows of one request in the flattened batch, its skip set or None); rows not in any
    group run everything. Returns None when nothing is skipped or measured, so the model takes
    its plain path (bit-identical to no skipping)."""
    active = [(rows, s) for rows, s in groups if s is not None and len(s)]
    if not active and measure_rows is None:
        return None
    all_rows = torch.arange(num_rows)
    running_cache: dict[tuple[int, ...], torch.Tensor] = {}  # equal row sets share one tensor

    def layer_part(layer: int, kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        skipping = [(rows, getattr(s, kind)[layer]) for rows, s in active if layer in getattr(s, kind)]
        if not skipping:
            return None, None
        scale = torch.ones(num_rows, dtype=dtype)
        run = torch.ones(num_rows, dtype=torch.bool)
        key = []
        for gi, (rows, s) in enumerate(active):
            if layer in getattr(s, kind):
                scale[rows] = getattr(s, kind)[layer]
                run[rows] = False
                key.append(gi)
        k = tuple(key)
        if k not in running_cache:
            running_cache[k] = all_rows[run]
        return running_cache[k], scale

    layers = []
    for i in range(num_layers):
        attn_rows, attn_scale = layer_part(i, "attn")
        ffn_rows, ffn_scale = layer_part(i, "ffn")
        layers.append(LayerSkip(attn_rows, attn_scale, ffn_rows, ffn_scale))
    return SkipPlan(layers=layers, measure_rows=measure_rows)
