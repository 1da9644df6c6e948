"""The sublayers one request skips in one step, each with the residual multiplier replacing it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["attn", "ffn"]


@dataclass(frozen=True, eq=True)
class SkipSet:
    """layer -> scale for skipped attention and FFN sublayers; a skipped sublayer does x <- scale * x."""

    attn: dict[int, float] = field(default_factory=dict)
    ffn: dict[int, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.attn) + len(self.ffn)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.attn.items())), tuple(sorted(self.ffn.items()))))

    def sublayers(self) -> set[tuple[int, Kind]]:
        return {(i, "attn") for i in self.attn} | {(i, "ffn") for i in self.ffn}

    def union(self, other: SkipSet) -> SkipSet:
        """Both sets; where both skip a sublayer, this set's scale wins."""
        return SkipSet({**other.attn, **self.attn}, {**other.ffn, **self.ffn})

    @classmethod
    def of(cls, sublayers: list[tuple[int, Kind]], scales: dict[tuple[int, Kind], float] | None = None) -> SkipSet:
        """From (layer, kind) pairs; scale 1.0 (no rescaling) where `scales` gives none."""
        scales = scales or {}
        attn = {i: scales.get((i, k), 1.0) for i, k in sublayers if k == "attn"}
        ffn = {i: scales.get((i, k), 1.0) for i, k in sublayers if k == "ffn"}
        return cls(attn, ffn)


EMPTY = SkipSet()
