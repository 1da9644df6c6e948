"""POST /v1/completions: a raw prompt (string, strings, token ids, or lists of token ids)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from strata.engine.async_engine import AsyncEngine
from strata.engine.sampling_params import SamplingParams
from strata.engine.tokenizer import Tokenizer
from strata.server.errors import bad_request
from strata.server.logprobs import completion_logprobs
from strata.server.pipeline import Call, Prepared, Run, prepare, start, stream_response
from strata.server.protocol import CompletionRequest
from strata.server.sampling import max_new_tokens, sampling_params
from strata.server.sse import SSE_DONE, EventStream, sse
from strata.server.state import ServerState
from strata.server.structured import output_grammar
from strata.server.usage import usage


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


@dataclass(kw_only=True)
class PreparedCompletion(Prepared):
    """Each of the request's prompts n times over (choice i*n + j is prompt i's choice j)."""

    echo: list[str]  # what each choice's text starts with: its prompt when `echo` is set, else ""
    prompt_tokens: int  # of the request's prompts, each counted once


def _prepare(body: CompletionRequest, engine: AsyncEngine) -> PreparedCompletion:
    """Tokens and sampling parameters of every choice, and the echoed prompts: CPU work, run off the event loop."""
    tok, limit = engine.tokenizer, engine.context_limit
    prompts = _prompts(body, tok)
    grammar = output_grammar(body, engine.grammars)
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
    return PreparedCompletion(prompts=all_prompts, params=params, echo=echo,
                              prompt_tokens=sum(len(ids) for ids in prompts))


async def completions(state: ServerState, body: CompletionRequest, headers: Headers, tenant: str
                      ) -> JSONResponse | EventStream:
    state.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", param="best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs (prompt logprobs) is not supported", param="echo")
    tok = state.ready_engine().tokenizer
    prep = await prepare(state, partial(_prepare, body))
    call = Call(request_id=f"cmpl-{uuid.uuid4().hex}", headers=headers, tenant=tenant, stream=body.stream,
                prompt_cache_key=body.prompt_cache_key, user=body.user, skip=body.skip)
    created = int(time.time())
    run = await start(state, call, prep)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(run, _chunks(state, tok, call.request_id, created, prep, run, include_usage))

    results = await run.gather()
    choices = [
        {
            "index": i,
            "text": prep.echo[i] + r.text,
            "logprobs": completion_logprobs(tok, r.logprobs, len(prep.echo[i])) if body.logprobs is not None
            else None,
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    completion = sum(r.num_output_tokens for r in results)
    return JSONResponse({
        "id": call.request_id, "object": "text_completion", "created": created, "model": state.model_name,
        "choices": choices, "usage": usage(prep.prompt_tokens, completion, results[0].num_cached_tokens),
        "system_fingerprint": None,
    }, headers=run.headers)


async def _chunks(state: ServerState, tok: Tokenizer, rid: str, created: int, prep: PreparedCompletion, run: Run,
                  include_usage: bool) -> AsyncGenerator[str, None]:
    """The stream's chunks; an error among the outputs ends it (see stream_response)."""
    base: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                            "model": state.model_name, "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    completion = [0] * len(prep.params)
    offsets = [len(e) for e in prep.echo]
    cached = 0
    for i, e in enumerate(prep.echo):
        if e:
            yield sse(base | {"choices": [{"index": i, "text": e, "logprobs": None, "finish_reason": None}]})

    async for i, out in run.outputs():
        completion[i] = out.num_output_tokens
        cached = out.num_cached_tokens if i == 0 else cached
        lp = completion_logprobs(tok, out.logprobs, offsets[i]) if prep.params[i].logprobs else None
        offsets[i] += len(out.new_text)
        if out.new_text or out.logprobs or out.finished:
            yield sse(base | {"choices": [{"index": i, "text": out.new_text, "logprobs": lp,
                                           "finish_reason": out.finish_reason if out.finished else None}]})
    if include_usage:
        yield sse(base | {"choices": [], "usage": usage(prep.prompt_tokens, sum(completion), cached)})
    yield SSE_DONE
