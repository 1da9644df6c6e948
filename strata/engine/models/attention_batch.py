"""Where each token of one flattened batch reads and writes the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSlice:
    """Rows [start, end) of the batch are new tokens of one sequence with `history` cached tokens."""

    start: int
    end: int
    history: int
    # Slots of all history + new tokens; None when there is no history (attend to the new K/V directly).
    context_slots: torch.Tensor | None


@dataclass
class AttentionBatch:
    slots: torch.Tensor  # [T] where each new token's K/V is written
    prefills: list[PrefillSlice]
    decode_rows: torch.Tensor  # [B] rows of single-token (decode) sequences
    decode_block_tables: torch.Tensor  # [B, max_blocks]
    decode_context_lens: torch.Tensor  # [B] context length including the new token
