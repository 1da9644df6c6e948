"""Runs one flattened batch through the model and returns the logits rows that are sampled."""

from __future__ import annotations

from collections.abc import Callable

import torch

from strata.engine.models.attention_batch import AttentionBatch, PrefillSlice
from strata.engine.models.llama import LlamaModel
from strata.engine.scheduler import ScheduledBatch
from strata.engine.sequence import Sequence
from strata.storage.block_pool import BlockPool
from strata.storage.kv_store import KVStore
from strata.storage.load_handle import KVLoadError


class LoadFailed(RuntimeError):
    """History KV of `seq` never arrived; the step computed nothing."""

    def __init__(self, seq: Sequence, cause: KVLoadError) -> None:
        super().__init__(str(cause))
        self.seq = seq


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: BlockPool, store: KVStore | None) -> None:
        self.model = model
        self.pool = pool
        self.store = store

    def _wait_for_loads(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        loading = [seq for seq, _ in batch.items if seq.load is not None]
        if not loading or self.store is None:
            return None
        store = self.store

        def wait(layer: int) -> None:
            for seq in loading:
                try:
                    store.wait_layer(seq.load, layer)
                except KVLoadError as e:
                    raise LoadFailed(seq, e) from e

        return wait

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        bs = self.pool.block_size
        table = torch.tensor(seq.block_table, dtype=torch.long)
        pos = torch.arange(start, end)
        return table[pos // bs] * bs + pos % bs

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the scheduled tokens; returns the sequences that sample now and their logits."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        prefills: list[PrefillSlice] = []
        decode_rows: list[int] = []
        decode_seqs: list[Sequence] = []
        sample_rows: list[int] = []
        sampling: list[Sequence] = []
        for seq, n in batch.items:
            start, c = len(ids), seq.num_computed
            ids.extend(seq.token_ids[c : c + n])
            positions.extend(range(c, c + n))
            slots.append(self._slots(seq, c, c + n))
            if n == 1:
                decode_rows.append(start)
                decode_seqs.append(seq)
            else:
                ctx = self._slots(seq, 0, c + n) if c > 0 else None
                prefills.append(PrefillSlice(start, start + n, c, ctx))
            if c + n == seq.num_tokens:
                sample_rows.append(start + n - 1)
                sampling.append(seq)

        max_blocks = max((len(s.block_table) for s in decode_seqs), default=1)
        tables = torch.zeros(len(decode_seqs), max_blocks, dtype=torch.long)
        for i, s in enumerate(decode_seqs):
            tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.long)
        attn = AttentionBatch(
            slots=torch.cat(slots),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long),
            decode_block_tables=tables,
            decode_context_lens=torch.tensor([s.num_computed + 1 for s in decode_seqs], dtype=torch.long),
        )
        hidden = self.model.forward(
            torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), attn, self.pool.kv,
            before_layer=self._wait_for_loads(batch),
        )
        # Logits only for the positions that are sampled from.
        logits = self.model.logits(hidden[torch.tensor(sample_rows, dtype=torch.long)])
        for seq, n in batch.items:
            seq.num_computed += n
            seq.load = None  # every layer has arrived
        return sampling, logits
