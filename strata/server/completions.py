"""POST /v1/completions: a raw prompt (string, strings, token ids, or lists of token ids)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from strata.engine.grammar import GrammarCompiler
from strata.engine.request import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.engine.tokenizer import Tokenizer
from strata.server.choices import (
    admit,
    cache_headers,
    fetch_shared_history,
    gather_choices,
    prepend,
    run_choices,
    usage,
)
from strata.server.errors import APIError, bad_request
from strata.server.logprobs import completion_logprobs
from strata.server.offload import off_loop
from strata.server.protocol import CompletionRequest
from strata.server.sampling import max_new_tokens, sampling_params
from strata.server.session_key import session_key
from strata.server.skip import skip_headers, skip_request
from strata.server.sse import SSE_DONE, EventStream, sse
from strata.server.state import ServerState
from strata.server.structured import output_grammar


def _prompts(body: CompletionRequest, tok: Tokenizer) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        raw: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        raw = [p]
    else:
        raw = list(p)
    if not raw:
        raise bad_request("prompt is empty", param="prompt")
    prompts = []
    for item in raw:
        ids = tok.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise bad_request("prompt is empty", param="prompt")
        if any(t >= tok.vocab_size for t in ids):
            raise bad_request(f"prompt token ids must be below the vocabulary size {tok.vocab_size}",
                              param="prompt")
        prompts.append(ids)
    return prompts


def _prepare(body: CompletionRequest, tok: Tokenizer, limit: int, grammars: GrammarCompiler
             ) -> tuple[list[list[int]], list[list[int]], list[SamplingParams], list[str]]:
    """Tokens and sampling parameters of every choice, and the echoed prompts: CPU work, run off the event loop.

    Returns (the prompts, each choice's prompt, each choice's parameters, each choice's echo).
    """
    prompts = _prompts(body, tok)
    grammar = output_grammar(body, grammars)
    params: list[SamplingParams] = []
    all_prompts: list[list[int]] = []
    for ids in prompts:
        max_tokens = max_new_tokens(body.max_tokens or 16, len(ids), limit)
        for i in range(body.n):
            params.append(sampling_params(body, max_tokens=max_tokens, vocab_size=tok.vocab_size,
                                          logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0,
                                          choice=i, grammar=grammar))
            all_prompts.append(ids)
    echo = [tok.decode(ids) if body.echo else "" for ids in all_prompts]
    return prompts, all_prompts, params, echo


async def completions(state: ServerState, body: CompletionRequest, headers: Headers, tenant: str
                      ) -> JSONResponse | EventStream:
    state.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", param="best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs (prompt logprobs) is not supported", param="echo")
    engine = state.ready_engine()
    tok = engine.tokenizer
    prompts, all_prompts, params, echo = await off_loop(_prepare, body, tok, engine.context_limit, engine.grammars)
    key = session_key(headers, tenant, body.prompt_cache_key, body.user)
    skip = skip_request(state, body.skip, headers)
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    prompt_tokens = sum(len(ids) for ids in prompts)
    await fetch_shared_history(engine, key, all_prompts[0])
    admit(engine)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        outputs = run_choices(engine, rid, all_prompts, params, key, skip=skip, tenant=tenant)
        first = await anext(outputs)  # errors before the first token are plain HTTP errors
        gen = _stream(state, rid, created, outputs, first, params, include_usage, echo, prompt_tokens)
        headers = cache_headers(first[1].num_cached_tokens, first[1].cache_tier
                                                                ) | skip_headers(first[1].skip)
        return EventStream(gen, outputs, headers)

    results = await gather_choices(engine, rid, all_prompts, params, key, skip=skip, tenant=tenant)
    choices = [
        {
            "index": i,
            "text": echo[i] + r.text,
            "logprobs": completion_logprobs(tok, r.logprobs, len(echo[i])) if body.logprobs is not None
            else None,
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    completion = sum(r.num_output_tokens for r in results)
    return JSONResponse({
        "id": rid, "object": "text_completion", "created": created, "model": state.model_name,
        "choices": choices, "usage": usage(prompt_tokens, completion, results[0].num_cached_tokens),
        "system_fingerprint": None,
    }, headers=cache_headers(results[0].num_cached_tokens, results[0].cache_tier) | skip_headers(results[0].skip))


async def _stream(state: ServerState, rid: str, created: int, outputs: AsyncIterator[tuple[int, RequestOutput]],
                  first: tuple[int, RequestOutput], params: list[SamplingParams], include_usage: bool,
                  echo: list[str], prompt_tokens: int) -> AsyncIterator[str]:
    tok = state.ready_engine().tokenizer
    base: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                            "model": state.model_name, "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    completion = [0] * len(params)
    offsets = [len(e) for e in echo]
    cached = 0
    for i, e in enumerate(echo):
        if e:
            yield sse(base | {"choices": [{"index": i, "text": e, "logprobs": None, "finish_reason": None}]})

    try:
        async for i, out in prepend(first, outputs):
            if out.error is not None:
                raise APIError(500, out.error, type="server_error", code="internal_error")
            completion[i] = out.num_output_tokens
            cached = out.num_cached_tokens if i == 0 else cached
            lp = completion_logprobs(tok, out.logprobs, offsets[i]) if params[i].logprobs else None
            offsets[i] += len(out.new_text)
            if out.new_text or out.logprobs or out.finished:
                yield sse(base | {"choices": [{"index": i, "text": out.new_text, "logprobs": lp,
                                               "finish_reason": out.finish_reason if out.finished else None}]})
    except APIError as e:
        yield sse(e.body())
        yield SSE_DONE
        return
    finally:
        await outputs.aclose()
    if include_usage:
        yield sse(base | {"choices": [], "usage": usage(prompt_tokens, sum(completion), cached)})
    yield SSE_DONE
