"""Turn logits into next tokens, as each request's sampling parameters ask.

Plain greedy rows (no penalties, bias or logprobs: most traffic) are one argmax over the batch;
every other row is sampled on its own.
"""

from __future__ import annotations

import torch

from strata.engine.request import TokenLogprob
from strata.engine.sampling_params import SamplingParams


def _apply_penalties(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> None:
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(output, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(0)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cum - sorted_probs) >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample_token(
    logits: torch.Tensor,
    p: SamplingParams,
    prompt: list[int],
    output: list[int],
    stop_ids: list[int],
    generator: torch.Generator,
) -> tuple[int, TokenLogprob | None]:
    """logits: [vocab] float32 (not modified). Returns the token and, if asked, its logprobs."""
    logprob = None
    if p.logprobs:
        # Logprobs of the model's own distribution, before any sampling transformation.
        lp = torch.log_softmax(logits, dim=-1)
    if p.needs_processing:
        logits = logits.clone()
        if p.bias is not None:
            logits.index_add_(0, *p.bias)
        if len(output) < p.min_tokens and stop_ids:
            logits[torch.tensor(stop_ids, dtype=torch.long)] = float("-inf")
        _apply_penalties(logits, p, prompt, output)
    if p.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = _filter(logits / p.temperature, p)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if p.logprobs:
        top: list[tuple[int, float]] = []
        if p.top_logprobs:
            vals, ids = torch.topk(lp, p.top_logprobs)
            top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        logprob = TokenLogprob(token, float(lp[token]), top)
    return token, logprob


def plain_greedy_tokens(logits: torch.Tensor, params: list[SamplingParams]) -> dict[int, int]:
    """Row -> token for the rows that are plain argmax, in one batched call. logits: [rows, vocab]."""
    rows = [i for i, p in enumerate(params) if p.greedy and not p.needs_processing and not p.logprobs]
    if not rows:
        return {}
    picked = logits if len(rows) == len(params) else logits[torch.tensor(rows, dtype=torch.long)]
    return dict(zip(rows, picked.argmax(dim=-1).tolist(), strict=True))
