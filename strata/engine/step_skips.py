"""The sublayer skipping of one engine step: each skipping sequence's rows with the SkipSet its state picks.

ModelRunner adds every sequence that has a skip state while it flattens the batch; `plan()` gives
the model's SkipPlan (None when nothing is skipped or measured, so the model takes its plain
path), and `observe()` feeds AdaSkip's online measurements back after the forward. A layer
whose attention a sequence skips from some token on is stopped in its block table there: the
scheduler gave it no blocks at that layer if it foresaw the skip, and any it did give are freed.
"""

from __future__ import annotations

import torch

from strata.engine.models.attention_batch import SkipPlan
from strata.engine.sequence import Sequence
from strata.engine.skip.plan import build_skip_plan
from strata.engine.skip.request_state import RequestSkipState
from strata.engine.skip.skip_set import SkipSet
from strata.storage.block_pool import BlockPool


class StepSkips:
    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool
        self._groups: list[tuple[torch.Tensor, SkipSet]] = []
        self._measured: list[tuple[RequestSkipState, int]] = []  # (state, its row), in measure_rows order
        self._plan: SkipPlan | None = None

    def add(self, seq: Sequence, first_row: int, prompt_rows: int, num_rows: int) -> None:
        """Rows first_row.. hold tokens seq.num_computed..: the first `prompt_rows` are prompt tokens
        (one prefill step, skipped as a whole), each later row one generated token (a decode step;
        a replay when recomputed after a preemption)."""
        state = seq.skip
        assert state is not None
        c = seq.num_computed
        sets: list[tuple[int, int, SkipSet]] = []  # (first row, rows, set), in token order
        if prompt_rows:
            sets.append((first_row, prompt_rows, state.plan_for_step(True)))
        for i in range(prompt_rows, num_rows):
            row = first_row + i
            sets.append((row, 1, state.plan_for_step(False, decode_step=c + i - seq.num_prompt_tokens)))
            if state.measuring:
                self._measured.append((state, row))
        for row, n, s in sets:
            self._groups.append((torch.arange(row, row + n), s))
            for layer in s.attn:
                seq.blocks.stop(self._pool, layer, c + row - first_row)
        # From the first token computed with a skip on, this sequence's KV is not the full model's.
        dirty = next((c + row - first_row for row, _, s in sets if len(s)), None)
        if dirty is not None:
            seq.skip_from = dirty if seq.skip_from is None else min(seq.skip_from, dirty)

    def plan(self, num_rows: int, num_layers: int, dtype: torch.dtype) -> SkipPlan | None:
        measure = torch.tensor([row for _, row in self._measured], dtype=torch.long) if self._measured else None
        self._plan = build_skip_plan(num_rows, num_layers, self._groups, measure, dtype)
        return self._plan

    def observe(self) -> None:
        """After the forward: each measured decode step's statistics to its request's state."""
        if self._plan is None:
            return
        for i, (state, _) in enumerate(self._measured):
            state.observe(self._plan.stats, row=i)
