"""One sequence through LlamaModel with a skip set, over its own small paged KV cache.

Calibration, the tests and the benchmark use it; the engine builds its batches in ModelRunner.
"""

from __future__ import annotations

import torch

from strata.engine.models.attention_batch import AttentionBatch, PrefillSlice, SublayerStats
from strata.engine.models.llama import LlamaModel
from strata.engine.skip.plan import build_skip_plan
from strata.engine.skip.skip_set import SkipSet

_NONE = torch.zeros(0, dtype=torch.long)


class SequenceRunner:
    def __init__(self, model: LlamaModel, max_tokens: int, block_size: int = 16) -> None:
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        blocks = -(-max_tokens // block_size)
        layers = cfg.num_hidden_layers
        self.kv = torch.zeros(2, layers * blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                              dtype=model.dtype)
        # Layer l owns blocks l * blocks ..: a token's slot there is l * blocks * block_size + position.
        self.table = torch.arange(layers * blocks).view(layers, blocks)
        self._layer_base = torch.arange(layers)[:, None] * blocks * block_size
        self.length = 0

    def reset(self) -> None:
        self.length = 0  # stale K/V beyond `length` is never read

    def _forward(self, ids: list[int], batch: AttentionBatch, skip: SkipSet | None,
                 measure: bool) -> tuple[torch.Tensor, list[SublayerStats]]:
        n = len(ids)
        cfg = self.model.cfg
        plan = build_skip_plan(n, cfg.num_hidden_layers, [(torch.arange(n), skip)],
                               measure_rows=torch.arange(n) if measure else None, dtype=self.model.dtype)
        positions = torch.arange(self.length, self.length + n)
        with torch.inference_mode():
            hidden = self.model.forward(torch.tensor(ids, dtype=torch.long), positions, batch, self.kv, plan)
        self.length += n
        return hidden, (plan.stats if plan is not None and measure else [])

    def prefill(self, ids: list[int], skip: SkipSet | None = None, measure: bool = False,
                logits_from: int | None = None) -> tuple[torch.Tensor, list[SublayerStats]]:
        """Append `ids` as one prefill chunk. Returns logits of rows logits_from.. (default: the
        last row only) and, with `measure`, per-layer IO statistics of every row."""
        start, n = self.length, len(ids)
        slots = self._layer_base + torch.arange(start, start + n)
        ctx = self._layer_base + torch.arange(start + n) if start > 0 else None
        batch = AttentionBatch(slots, [PrefillSlice(0, n, start, ctx)], _NONE,
                               torch.zeros(len(self.table), 0, 1, dtype=torch.long), _NONE)
        hidden, stats = self._forward(ids, batch, skip, measure)
        rows = hidden[n - 1 :] if logits_from is None else hidden[logits_from:]
        with torch.inference_mode():
            return self.model.logits(rows), stats

    def decode(self, token: int, skip: SkipSet | None = None,
               measure: bool = False) -> tuple[torch.Tensor, list[SublayerStats]]:
        """One decode step; returns the logits [vocab] of the next token."""
        slot = self._layer_base + self.length
        batch = AttentionBatch(slot, [], torch.tensor([0]), self.table[:, None],
                               torch.tensor([self.length + 1]))
        hidden, stats = self._forward([token], batch, skip, measure)
        with torch.inference_mode():
            return self.model.logits(hidden)[0], stats
