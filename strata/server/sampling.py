"""OpenAI request fields -> the engine's SamplingParams, with the context-length check."""

from __future__ import annotations

from strata.engine.sampling_params import SamplingParams
from strata.server.errors import bad_request
from strata.server.protocol import SamplingFields


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
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k, 0),
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
    )
