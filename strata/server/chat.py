"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from strata.engine.request import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.engine.tokenizer import ChatTemplateError, Tokenizer
from strata.server.choices import admit, cache_headers, gather_choices, prepend, run_choices, usage
from strata.server.errors import APIError, bad_request
from strata.server.logprobs import chat_logprobs
from strata.server.offload import off_loop
from strata.server.overflow import Fitted, completion_reserve, fit_messages
from strata.server.protocol import ChatCompletionRequest
from strata.server.sampling import max_new_tokens, sampling_params
from strata.server.session_key import session_key
from strata.server.skip import skip_headers, skip_request
from strata.server.sse import SSE_DONE, EventStream, sse
from strata.server.state import ServerState


def _check_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise bad_request("This model does not support tools; remove `tools`.", param="tools")
    if body.tool_choice not in (None, "none"):
        raise bad_request("This model does not support tools; remove `tool_choice`.", param="tool_choice")
    fmt = (body.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format type {fmt!r} is not supported; only 'text'.",
                          param="response_format")


def _fit_context(state: ServerState, tok: Tokenizer, messages: list[dict[str, Any]], prompt: list[int],
                 requested: int | None, limit: int, add_generation_prompt: bool) -> Fitted | None:
    """--context-overflow truncate: drop the oldest turns when the prompt leaves no room for the completion.

    None when nothing needs to go, or nothing can (then the usual context-length check answers).
    """
    reserve = completion_reserve(requested, limit)
    if state.settings.context_overflow != "truncate" or len(prompt) + reserve <= limit:
        return None
    return fit_messages(lambda m: tok.encode_chat(m, add_generation_prompt), messages, prompt, limit - reserve)


@dataclass
class _Prepared:
    prompt: list[int]
    params: list[SamplingParams]
    truncation: tuple[int, int] | None
    dropped: int  # tokens of history dropped to fit the context


def _prepare(state: ServerState, body: ChatCompletionRequest, tok: Tokenizer, limit: int) -> _Prepared:
    """Template, tokens, context fitting and sampling parameters: CPU work, run off the event loop."""
    messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                for m in body.messages]
    try:
        prompt = tok.encode_chat(messages, body.add_generation_prompt)
    except ChatTemplateError as e:
        raise bad_request(str(e), param="messages") from e
    requested = body.max_completion_tokens or body.max_tokens
    fitted = _fit_context(state, tok, messages, prompt, requested, limit, body.add_generation_prompt)
    if fitted is not None:
        prompt = fitted.prompt_ids
    max_tokens = max_new_tokens(requested, len(prompt), limit)
    params = [sampling_params(body, max_tokens=max_tokens, vocab_size=tok.vocab_size, logprobs=body.logprobs,
                              top_logprobs=body.top_logprobs or 0, choice=i) for i in range(body.n)]
    return _Prepared(prompt, params, fitted.truncation if fitted else None, fitted.dropped_tokens if fitted else 0)


async def chat_completions(state: ServerState, body: ChatCompletionRequest, headers: Headers, tenant: str
                           ) -> JSONResponse | EventStream:
    state.check_model(body.model)
    _check_unsupported(body)
    engine = state.ready_engine()
    tok = engine.engine.tokenizer
    prep = await off_loop(_prepare, state, body, tok, engine.engine.context_limit)
    prompt, params, truncation, dropped = prep.prompt, prep.params, prep.truncation, prep.dropped
    key = session_key(headers, tenant, body.prompt_cache_key, body.user)
    skip = skip_request(state, body.skip, headers)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    prompts = [prompt] * body.n
    admit(engine)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        outputs = run_choices(engine, rid, prompts, params, key, truncation, skip, tenant)
        # Wait for the first token: errors before it are plain HTTP errors, and the headers can say
        # how much history was reused.
        first = await anext(outputs)
        gen = _stream(state, rid, created, len(prompt), outputs, first, include_usage, body.logprobs, body.n)
        headers = cache_headers(first[1].num_cached_tokens, first[1].cache_tier,
                                                                dropped) | skip_headers(first[1].skip)
        return EventStream(gen, outputs, headers)

    results = await gather_choices(engine, rid, prompts, params, key, truncation, skip, tenant)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.text, "refusal": None},
            "logprobs": chat_logprobs(tok, r.logprobs) if body.logprobs else None,
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    totals = usage(len(prompt), sum(r.num_output_tokens for r in results), results[0].num_cached_tokens)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
        "choices": choices, "usage": totals, "system_fingerprint": None,
    }, headers=cache_headers(results[0].num_cached_tokens, results[0].cache_tier, dropped) | skip_headers(
        results[0].skip))


async def _stream(state: ServerState, rid: str, created: int, prompt_tokens: int,
                  outputs: AsyncIterator[tuple[int, RequestOutput]], first: tuple[int, RequestOutput],
                  include_usage: bool, logprobs: bool, n: int) -> AsyncIterator[str]:
    tok = state.ready_engine().engine.tokenizer
    base: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": state.model_name, "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    completion = [0] * n
    cached = 0
    for i in range(n):
        yield sse(base | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]})

    try:
        async for i, out in prepend(first, outputs):
            if out.error is not None:
                raise APIError(500, out.error, type="server_error", code="internal_error")
            completion[i] = out.num_output_tokens
            cached = out.num_cached_tokens if i == 0 else cached
            if out.new_text or out.logprobs:
                yield sse(base | {"choices": [{
                    "index": i, "delta": {"content": out.new_text},
                    "logprobs": chat_logprobs(tok, out.logprobs) if logprobs else None,
                    "finish_reason": None}]})
            if out.finished:
                yield sse(base | {"choices": [{"index": i, "delta": {}, "logprobs": None,
                                               "finish_reason": out.finish_reason}]})
    except APIError as e:
        # Headers are gone: an error inside a stream is a final event with an error object.
        yield sse(e.body())
        yield SSE_DONE
        return
    finally:
        await outputs.aclose()  # a disconnect lands here: aborts every choice
    if include_usage:
        yield sse(base | {"choices": [], "usage": usage(prompt_tokens, sum(completion), cached)})
    yield SSE_DONE
