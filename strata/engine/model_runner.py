"""Runs one flattened batch through the model and returns the logits rows that are sampled."""

from __future__ import annotations

from collections.abc import Callable

import torch

from strata.engine.models.attention_batch import AttentionBatch, PrefillSlice
from strata.engine.models.llama import LlamaModel
from strata.engine.scheduler import ScheduledBatch
from strata.engine.sequence import Sequence
from strata.engine.step_skips import StepSkips
from strata.storage.block_pool import BlockPool
from strata.storage.kv_store import KVStore
from strata.storage.load_handle import KVLoadError


class LoadFailed(RuntimeError):
    """History KV of `seq` never arrived; the step computed nothing."""

    def __init__(self, seq: Sequence, cause: KVLoadError) -> None:
        super().__init__(str(cause))
        self.seq = seq


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: BlockPool, store: KVStore | None, load_timeout_s: float) -> None:
        self.model = model
        self.pool = pool
        self.store = store
        self.load_timeout_s = load_timeout_s

    def _wait_for_loads(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        loading = [seq for seq, _ in batch.items if seq.load is not None]
        if not loading or self.store is None:
            return None
        store = self.store

        def wait(layer: int) -> None:
            for seq in loading:
                try:
                    store.wait_layer(seq.load, layer, self.load_timeout_s)
                except KVLoadError as e:
                    raise LoadFailed(seq, e) from e

        return wait

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the scheduled tokens; returns the sequences that sample now and their logits."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        prefills: list[PrefillSlice] = []
        decode_rows: list[int] = []
        decode_tables: list[torch.Tensor] = []  # [layers, blocks] each
        decode_lens: list[int] = []  # context length of each decode row, itself included
        sample_rows: list[int] = []
        sampling: list[Sequence] = []
        skips = StepSkips(self.pool)
        for seq, n in batch.items:
            start, c = len(ids), seq.num_computed
            ids.extend(seq.token_ids[c : c + n])
            positions.extend(range(c, c + n))
            slots.append(seq.blocks.slots(self.pool.block_size, c, c + n))
            # A skipping sequence that recomputes generated tokens (after a preemption) runs each of
            # them as a decode row of its own, so that each replays the skip set of its decode step.
            attend = n if seq.skip is None else min(n, max(seq.num_prompt_tokens - c, 0))
            if attend == 1:
                decode_rows.append(start)
                decode_tables.append(seq.blocks.tensor())
                decode_lens.append(c + 1)
            elif attend > 1:
                ctx = seq.blocks.slots(self.pool.block_size, 0, c + attend) if c > 0 else None
                prefills.append(PrefillSlice(start, start + attend, c, ctx))
            for i in range(attend, n):
                decode_rows.append(start + i)
                decode_tables.append(seq.blocks.tensor())
                decode_lens.append(c + i + 1)
            if seq.skip is not None:
                skips.add(seq, start, attend, n)
            if c + n == seq.num_tokens:
                sample_rows.append(start + n - 1)
                sampling.append(seq)

        layers = self.pool.num_layers
        max_blocks = max((t.shape[1] for t in decode_tables), default=1)
        tables = torch.zeros(layers, len(decode_tables), max_blocks, dtype=torch.long)
        for i, t in enumerate(decode_tables):
            tables[:, i, : t.shape[1]] = t
        attn = AttentionBatch(
            slots=torch.cat(slots, dim=1),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long),
            decode_block_tables=tables,
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long),
        )
        plan = skips.plan(len(ids), self.model.cfg.num_hidden_layers, self.model.dtype)
        hidden = self.model.forward(
            torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), attn, self.pool.kv,
            skip=plan, before_layer=self._wait_for_loads(batch),
        )
        skips.observe()
        # Logits only for the positions that are sampled from.
        logits = self.model.logits(hidden[torch.tensor(sample_rows, dtype=torch.long)])
        for seq, n in batch.items:
            seq.num_computed += n
            seq.load = None  # every layer has arrived
        return sampling, logits
