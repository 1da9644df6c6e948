"""Where each token of one flattened batch reads and writes the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class PrefillSlice:
    """Rows [start, end) of the batch are new tokens of one sequence with `history` cached tokens."""

    start: int
    end: int
    history: int
    # [layers, history + new] slots of all history + new tokens at each layer; None when there is
    # no history (attend to the new K/V directly).
    context_slots: torch.Tensor | None


@dataclass
class AttentionBatch:
    """Index tensors of one batch; every layer has its own row of slots and block tables, since a
    sequence's blocks differ per layer (see strata.storage.block_table)."""

    slots: torch.Tensor  # [layers, T] where each new token's K/V is written (-1: the layer stores none)
    prefills: list[PrefillSlice]
    decode_rows: torch.Tensor  # [B] rows of single-token (decode) sequences
    decode_block_tables: torch.Tensor  # [layers, B, max_blocks]
    decode_context_lens: torch.Tensor  # [B] context length including the new token

    @cached_property
    def decode_only(self) -> bool:
        """Every row is a decode row, in order (decode_rows is sorted): attention writes its output directly."""
        return not self.prefills and self.decode_rows.shape[0] == self.slots.shape[1]

    @cached_property
    def layer_slots(self) -> tuple[torch.Tensor, ...]:
        """slots per layer, split once per step (indexing a tensor per layer costs more)."""
        return self.slots.unbind(0)

    @cached_property
    def layer_block_tables(self) -> tuple[torch.Tensor, ...]:
        return self.decode_block_tables.unbind(0)

    def select(self, rows: torch.Tensor) -> AttentionBatch:
        """The same batch restricted to `rows` (sorted), renumbered 0..len(rows)-1.

        Used when only some rows run a layer's attention (sublayer skipping): a prefill
        slice must be kept or dropped whole, since its tokens attend to each other.
        """
        new_index = torch.full((self.slots.shape[1],), -1, dtype=torch.long, device=self.slots.device)
        new_index[rows] = torch.arange(rows.shape[0], device=self.slots.device)
        prefills = []
        for p in self.prefills:
            kept = new_index[p.start : p.end] >= 0
            if bool(kept.any()) != bool(kept.all()):
                raise ValueError(f"rows {p.start}..{p.end} of one prefill slice are partly skipped")
            if kept.any():
                start = int(new_index[p.start])
                prefills.append(PrefillSlice(start, start + p.end - p.start, p.history, p.context_slots))
        keep_decode = new_index[self.decode_rows] >= 0
        return AttentionBatch(
            slots=self.slots[:, rows],
            prefills=prefills,
            decode_rows=new_index[self.decode_rows[keep_decode]],
            decode_block_tables=self.decode_block_tables[:, keep_decode],
            decode_context_lens=self.decode_context_lens[keep_decode],
        )

    def to(self, device: torch.device) -> AttentionBatch:
        """The same batch with its index tensors on `device`."""
        return AttentionBatch(
            slots=self.slots.to(device),
            prefills=[PrefillSlice(p.start, p.end, p.history, _to(p.context_slots, device)) for p in self.prefills],
            decode_rows=self.decode_rows.to(device),
            decode_block_tables=self.decode_block_tables.to(device),
            decode_context_lens=self.decode_context_lens.to(device),
        )


def _to(t: torch.Tensor | None, device: torch.device,
        moved: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
    """`t` on `device`; with `moved`, a tensor shared by several owners is moved once and stays shared."""
    if t is None:
        return None
    if moved is None:
        return t.to(device)
    if id(t) not in moved:
        moved[id(t)] = t.to(device)
    return moved[id(t)]


@dataclass
class LayerSkip:
    """Which rows run the two sublayers of one layer; the other rows scale their residual stream.

    `*_rows` None means every row runs the sublayer (the unmodified path). Otherwise it holds the
    sorted rows that run it, and `*_scale` ([T]) the multiplier of each row's residual stream:
    the skip scale for skipped rows and exactly 1 for running rows (x * 1 == x bit for bit).
    """

    attn_rows: torch.Tensor | None = None
    attn_scale: torch.Tensor | None = None
    ffn_rows: torch.Tensor | None = None
    ffn_scale: torch.Tensor | None = None


@dataclass
class SublayerStats:
    """IO statistics of one layer for the measured rows (NaN where the row skipped the sublayer).

    With x the layer input, a = x + Attn(norm x) and b = a + FFN(norm a):
    sim_attn = cos(x, a), scale_attn = |a| / |x|, sim_ffn = cos(a, b), scale_ffn = |b| / |a|.
    """

    sim_attn: torch.Tensor
    scale_attn: torch.Tensor
    sim_ffn: torch.Tensor
    scale_ffn: torch.Tensor

    def to(self, device: torch.device) -> SublayerStats:
        return SublayerStats(self.sim_attn.to(device), self.scale_attn.to(device), self.sim_ffn.to(device),
                             self.scale_ffn.to(device))


@dataclass
class SkipPlan:
    """Per-row sublayer skipping for one forward pass (see strata.engine.skip.plan to build one).

    `layers` has one entry per model layer. When `measure_rows` is set, the forward appends one
    SublayerStats per layer to `stats` for those rows (calibration and AdaSkip's online step).
    """

    layers: list[LayerSkip]
    measure_rows: torch.Tensor | None = None
    stats: list[SublayerStats] = field(default_factory=list)

    def to(self, device: torch.device) -> SkipPlan:
        """The plan's tensors on `device`; `stats` stays the caller's list (the forward appends to it)."""
        moved: dict[int, torch.Tensor] = {}  # layers share row tensors: keep them shared
        layers = [LayerSkip(_to(ls.attn_rows, device, moved), _to(ls.attn_scale, device, moved),
                            _to(ls.ffn_rows, device, moved), _to(ls.ffn_scale, device, moved)) for ls in self.layers]
        return SkipPlan(layers, _to(self.measure_rows, device, moved), self.stats)
