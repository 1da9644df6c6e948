"""How one request wants its tokens chosen and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from strata.engine.grammar import Grammar

GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    grammar: Grammar | None = None  # structured output: what the text must match

    @property
    def greedy(self) -> bool:
        # Below this, dividing the logits by the temperature overflows: it is the argmax anyway (as vLLM).
        return self.temperature < GREEDY_BELOW

    @cached_property
    def bias(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """logit_bias as (token ids, values) tensors, applied in one operation."""
        if not self.logit_bias:
            return None
        return (torch.tensor(list(self.logit_bias), dtype=torch.long),
                torch.tensor(list(self.logit_bias.values()), dtype=torch.float32))

    @property
    def needs_processing(self) -> bool:
        """False when the next token is plainly the argmax of the raw logits."""
        return not (
            self.greedy
            and not self.logit_bias
            and self.min_tokens == 0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.repetition_penalty == 1.0
        )
