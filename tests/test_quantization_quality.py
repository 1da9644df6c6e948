"""Each --quantization mode stays within its stated tolerance of the float32 model (docs/quantization.md holds the
full `make bench-quant` run): mean KL at most 0.01, the same most likely next token at 90% of positions or more,
perplexity within 1%. Measured on held-out text and on float32's own answers to chat prompts (teacher-forced),
through the decode kernel's path (strata.engine.weights.quality)."""

from __future__ import annotations

import pytest
import torch

from strata.engine.models.llama import LlamaModel
from strata.engine.skip.corpus import python_docs_texts
from strata.engine.weights import quality
from strata.kernels.linear import Linear

PROMPTS = ("What is the capital of France?", "Give me three tips for better sleep.",
           "How do I reverse a list in Python?", "Why is the sky blue?")
ANSWER_TOKENS = 32
MAX_KL, MIN_SAME_TOP, MAX_PERPLEXITY_RATIO = 0.01, 0.9, 1.01


@pytest.fixture(scope="module")
def reference(model_files, tokenizer):
    """Token sequences and the positions scored in each, with float32's log-probabilities there."""
    model = LlamaModel.load(model_files.directory, torch.float32)
    cases = [(t, 1) for t in python_docs_texts("heldout", tokenizer.encode, 2, 256)]
    for p in PROMPTS:
        prompt = tokenizer.encode_chat([{"role": "user", "content": p}])
        cases.append((prompt + quality.greedy(model, prompt, ANSWER_TOKENS), len(prompt)))
    return [(ids, start, quality.log_probs(model, ids)[start - 1 : -1]) for ids, start in cases]


def scores_of(model: LlamaModel, reference) -> quality.Scores:
    scores = quality.Scores()
    for ids, start, ref in reference:
        scores.add(ref, quality.log_probs(model, ids)[start - 1 : -1], ids[start:])
    return scores


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_within_tolerance(mode, model_files, reference):
    s = scores_of(LlamaModel.load(model_files.directory, torch.float32, quantization=mode, gguf=model_files.gguf),
                  reference)
    assert s.mean_kl <= MAX_KL, f"{mode}: mean KL {s.mean_kl:.5f}"
    assert s.same_top_share >= MIN_SAME_TOP, f"{mode}: same top token at {s.same_top_share:.1%} of positions"
    assert s.perplexity <= s.perplexity_ref * MAX_PERPLEXITY_RATIO, (
        f"{mode}: perplexity {s.perplexity:.3f} against float32's {s.perplexity_ref:.3f}")


def test_the_gate_sees_quantization(model_files, reference):
    """The checks above can fail: a quantized model's distributions measurably differ from float32's, and a
    model whose weights are perturbed well beyond quantization is refused."""
    model = LlamaModel.load(model_files.directory, torch.float32, quantization="int8", gguf=model_files.gguf)
    assert scores_of(model, reference[:1]).mean_kl > 1e-5
    noisy = LlamaModel.load(model_files.directory, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for layer in noisy.layers:  # every FFN output replaced: far beyond any quantization
        layer.down = Linear(torch.randn(layer.down.out_features, layer.down.in_features, generator=gen) * 0.02)
    assert scores_of(noisy, reference[:1]).mean_kl > MAX_KL
