"""OpenAI request fields -> the engine's SamplingParams, with the context-length check."""

from __future__ import annotations

from strata.engine.grammar import Grammar
from strata.engine.sampling_params import SamplingParams
from strata.server.errors import bad_request
from strata.server.protocol import SamplingFields

# Temperatures below this sample greedily (as vLLM): dividing the logits by them overflows float32.
GREEDY_BELOW = 1e-5
# Any top_p below 1/vocabulary keeps only the most likely token, and one below float32's range (5e-324)
# would compare as 0 and drop every token: the floor changes nothing else.
MIN_TOP_P = 1e-6


def max_new_tokens(requested: int | None, prompt_len: int, context_limit: int) -> int:
    if prompt_len >= context_limit:
        raise bad_request(
            f"This model's maximum context length is {context_limit} tokens. However, your messages "
            f"resulted in {prompt_len} tokens. Please reduce the length of the messages.",
            param="messages", code="context_length_exceeded",
        )
    if requested is None:
        return context_limit - prompt_len
    if prompt_len + requested > context_limit:
        raise bad_request(
            f"This model's maximum context length is {context_limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="max_tokens", code="context_length_exceeded",
        )
    return requested


def sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int,
    vocab_size: int,
    logprobs: bool,
    top_logprobs: int,
    choice: int,
    grammar: Grammar | None = None,
) -> SamplingParams:
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        tok = int(key)
        if tok >= vocab_size:
            raise bad_request(f"logit_bias token id {tok} is out of the vocabulary (size {vocab_size})",
                              param="logit_bias")
        bias[tok] = value
    for tok in body.stop_token_ids or []:
        if tok >= vocab_size:
            raise bad_request(f"stop_token_ids: {tok} is out of the vocabulary", param="stop_token_ids")
    # Each of n choices draws from its own stream; with a seed the whole response is reproducible.
    seed = None if body.seed is None else body.seed + choice
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=1.0 if body.top_p is None else max(body.top_p, MIN_TOP_P),
        top_k=min(max(body.top_k, 0), vocab_size),  # any top_k past the vocabulary keeps all of it
        min_p=body.min_p,
        seed=seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=bias,
        min_tokens=min(body.min_tokens, max_tokens),
        ignore_eos=body.ignore_eos,
        stop=list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=body.skip_special_tokens,
        grammar=grammar,
    )
