"""How far a model variant (quantized weights) moves from a reference model (float32) on the same tokens.

- Next-token KL divergence KL(P_ref || P), averaged over every position of teacher-forced texts, and the
  perplexity of both models on those texts.
- Greedy agreement: how many leading tokens of a greedy continuation the two models share.

Both models run through SequenceRunner in chunks of at most QUANTIZED_KERNEL_MAX_ROWS tokens, so quantized
linear layers take the decode kernel's path (int8 activations, the coarser of the two): the figures hold for
the tokens a server generates. `make bench-quant` publishes them; tests/test_quantization_quality.py holds each
mode within its tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from strata.engine.models.llama import LlamaModel
from strata.engine.skip.sequence_runner import SequenceRunner
from strata.kernels.ops import QUANTIZED_KERNEL_MAX_ROWS


def log_probs(model: LlamaModel, ids: list[int], chunk: int = QUANTIZED_KERNEL_MAX_ROWS) -> torch.Tensor:
    """Log-softmax of the next-token logits after each position of `ids` (teacher-forced): [len(ids), vocab]."""
    runner = SequenceRunner(model, len(ids))
    out = []
    for start in range(0, len(ids), chunk):
        logits, _ = runner.prefill(ids[start : start + chunk], logits_from=0)
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)


@dataclass
class TextScores:
    """Sums over scored positions (each text's positions but its last, which has no next token)."""

    positions: int = 0
    kl: float = 0.0
    nll_ref: float = 0.0
    nll: float = 0.0

    def add(self, ref: torch.Tensor, other: torch.Tensor, ids: list[int]) -> None:
        ref, other = ref[:-1], other[:-1]
        target = torch.tensor(ids[1:])
        self.kl += float((ref.exp() * (ref - other)).sum())
        self.nll_ref -= float(ref.gather(1, target[:, None]).sum())
        self.nll -= float(other.gather(1, target[:, None]).sum())
        self.positions += len(ids) - 1

    @property
    def mean_kl(self) -> float:
        return self.kl / self.positions

    @property
    def perplexity_ref(self) -> float:
        return math.exp(self.nll_ref / self.positions)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.positions)


def greedy(model: LlamaModel, prompt: list[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens after `prompt` (end of sequence ignored), one decode step each."""
    runner = SequenceRunner(model, len(prompt) + new_tokens)
    logits = None
    for start in range(0, len(prompt), QUANTIZED_KERNEL_MAX_ROWS):
        logits, _ = runner.prefill(prompt[start : start + QUANTIZED_KERNEL_MAX_ROWS])
    assert logits is not None
    out = [int(logits[-1].argmax())]
    while len(out) < new_tokens:
        out.append(int(runner.decode(out[-1])[0].argmax()))
    return out


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
