"""How far a model variant (quantized weights) moves from a reference model (float32) on the same tokens.

- Next-token KL divergence KL(P_ref || P), averaged over every position of teacher-forced texts, the share of
  positions where both models' most likely token is the same, and the perplexity of both models.
- Greedy agreement: how many leading tokens of a greedy continuation the two models share.

Both models run through SequenceRunner, prefill in chunks; the quantized kernel computes each row on its own
(int8 activations per block), so the figures hold for prompts and generated tokens alike. `make bench-quant`
publishes them; tests/test_quantization_quality.py holds each mode within its tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from strata.engine.models.llama import LlamaModel
from strata.engine.skip.sequence_runner import SequenceRunner

CHUNK = 256  # prefill chunk: bounds the logits held at once


def log_probs(model: LlamaModel, ids: list[int], chunk: int = CHUNK) -> torch.Tensor:
    """Log-softmax of the next-token logits after each position of `ids` (teacher-forced): [len(ids), vocab]."""
    runner = SequenceRunner(model, len(ids))
    out = []
    for start in range(0, len(ids), chunk):
        logits, _ = runner.prefill(ids[start : start + chunk], logits_from=0)
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)


@dataclass
class Scores:
    """Sums over scored positions: KL(P_ref || P) and both models' negative log-likelihoods of the targets."""

    positions: int = 0
    kl: float = 0.0
    nll_ref: float = 0.0
    nll: float = 0.0
    same_top: int = 0  # positions where both models' most likely next token is the same

    def add(self, ref: torch.Tensor, other: torch.Tensor, targets: list[int]) -> None:
        """ref, other: log-probabilities [n, vocab] of the next token; targets: the n tokens that came next."""
        target = torch.tensor(targets)[:, None]
        self.kl += float((ref.exp() * (ref - other)).sum())
        self.nll_ref -= float(ref.gather(1, target).sum())
        self.nll -= float(other.gather(1, target).sum())
        self.same_top += int((ref.argmax(-1) == other.argmax(-1)).sum())
        self.positions += len(targets)

    @property
    def mean_kl(self) -> float:
        return self.kl / self.positions

    @property
    def same_top_share(self) -> float:
        return self.same_top / self.positions

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
    for start in range(0, len(prompt), CHUNK):
        logits, _ = runner.prefill(prompt[start : start + CHUNK])
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
