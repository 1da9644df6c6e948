"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from strata.engine.grammar import Grammar, GrammarCompiler
from strata.engine.request import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.engine.tokenizer import ChatTemplateError, Tokenizer
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
from strata.server.logprobs import chat_logprobs
from strata.server.offload import off_loop
from strata.server.overflow import Fitted, completion_reserve, fit_messages
from strata.server.protocol import ChatCompletionRequest
from strata.server.sampling import max_new_tokens, sampling_params
from strata.server.session_key import session_key
from strata.server.skip import skip_headers, skip_request
from strata.server.sse import SSE_DONE, EventStream, sse
from strata.server.state import ServerState
from strata.server.structured import compile_spec, output_grammar, requested_spec
from strata.server.tool_calls import ToolCallStream, new_call_id, parse_tool_output
from strata.server.tools import ToolPlan, template_messages, tool_grammar, tool_plan


def _fit_context(state: ServerState, tok: Tokenizer, messages: list[dict[str, Any]], prompt: list[int],
                 requested: int | None, limit: int, add_generation_prompt: bool,
                 tools: list[dict[str, Any]] | None) -> Fitted | None:
    """--context-overflow truncate: drop the oldest turns when the prompt leaves no room for the completion.

    None when nothing needs to go, or nothing can (then the usual context-length check answers).
    """
    reserve = completion_reserve(requested, limit)
    if state.settings.context_overflow != "truncate" or len(prompt) + reserve <= limit:
        return None
    return fit_messages(lambda m: tok.encode_chat(m, add_generation_prompt, tools), messages, prompt,
                        limit - reserve)


@dataclass
class PreparedChat:
    prompt: list[int]
    params: list[SamplingParams]
    truncation: tuple[int, int] | None
    dropped: int  # tokens of history dropped to fit the context
    tools: ToolPlan | None  # the tools the model may or must call


def prepare_chat(state: ServerState, body: ChatCompletionRequest, tok: Tokenizer, limit: int,
                 grammars: GrammarCompiler) -> PreparedChat:
    """Template, tokens, context fitting, grammar and sampling parameters: CPU work, run off the event loop."""
    plan = tool_plan(body, tok.template_source, state.settings.tool_call_parser)
    messages, tools = template_messages(body.messages, plan, tok.template_takes_tools)
    try:
        prompt = tok.encode_chat(messages, body.add_generation_prompt, tools)
    except ChatTemplateError as e:
        raise bad_request(str(e), param="messages") from e
    requested = body.max_completion_tokens or body.max_tokens
    fitted = _fit_context(state, tok, messages, prompt, requested, limit, body.add_generation_prompt, tools)
    if fitted is not None:
        prompt = fitted.prompt_ids
    max_tokens = max_new_tokens(requested, len(prompt), limit)
    grammar = _grammar(body, plan, grammars)
    params = [sampling_params(body, max_tokens=max_tokens, vocab_size=tok.vocab_size, logprobs=body.logprobs,
                              top_logprobs=body.top_logprobs or 0, choice=i, grammar=grammar)
              for i in range(body.n)]
    if plan is not None and plan.mode == "auto" and plan.parser == "mistral":
        for p in params:
            p.skip_special_tokens = False  # [TOOL_CALLS] is a special token: the parser must see it
    return PreparedChat(prompt, params, fitted.truncation if fitted else None, fitted.dropped_tokens if fitted else 0,
                     plan)


def _grammar(body: ChatCompletionRequest, plan: ToolPlan | None, grammars: GrammarCompiler) -> Grammar | None:
    """A required or named tool call is written under its grammar; otherwise response_format's, if any."""
    spec = tool_grammar(plan) if plan is not None else None
    if spec is None:
        return output_grammar(body, grammars)
    if requested_spec(body) is not None:
        raise bad_request("a required or named tool call cannot have a response format too",
                          param="response_format")
    return compile_spec(grammars, *spec)


async def chat_completions(state: ServerState, body: ChatCompletionRequest, headers: Headers, tenant: str
                           ) -> JSONResponse | EventStream:
    state.check_model(body.model)
    engine = state.ready_engine()
    tok = engine.tokenizer
    prep = await off_loop(prepare_chat, state, body, tok, engine.context_limit, engine.grammars)
    prompt, params, truncation, dropped = prep.prompt, prep.params, prep.truncation, prep.dropped
    key = session_key(headers, tenant, body.prompt_cache_key, body.user)
    skip = skip_request(state, body.skip, headers)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    prompts = [prompt] * body.n
    await fetch_shared_history(engine, key, prompt)
    admit(engine)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        outputs = run_choices(engine, rid, prompts, params, key, truncation, skip, tenant)
        # Wait for the first token: errors before it are plain HTTP errors, and the headers can say
        # how much history was reused.
        first = await anext(outputs)
        gen = _stream(state, rid, created, len(prompt), outputs, first, include_usage, body.logprobs, body.n,
                      prep.tools)
        headers = cache_headers(first[1].num_cached_tokens, first[1].cache_tier,
                                                                dropped) | skip_headers(first[1].skip)
        return EventStream(gen, outputs, headers)

    results = await gather_choices(engine, rid, prompts, params, key, truncation, skip, tenant)
    choices = [
        {
            "index": i,
            "logprobs": chat_logprobs(tok, r.logprobs) if body.logprobs else None,
        } | _message(r.text, r.finish_reason, prep.tools)
        for i, r in enumerate(results)
    ]
    totals = usage(len(prompt), sum(r.num_output_tokens for r in results), results[0].num_cached_tokens)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
        "choices": choices, "usage": totals, "system_fingerprint": None,
    }, headers=cache_headers(results[0].num_cached_tokens, results[0].cache_tier, dropped) | skip_headers(
        results[0].skip))


def _message(text: str, finish_reason: str | None, plan: ToolPlan | None) -> dict[str, Any]:
    """A whole choice's message and finish_reason: its text, or the tool calls in it."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if plan is None:
        return {"message": message, "finish_reason": finish_reason}
    content, calls = parse_tool_output(plan, text)
    message["content"] = content
    if calls:
        message["tool_calls"] = [{"id": new_call_id(), "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return {"message": message, "finish_reason": _finish_reason(finish_reason, bool(calls), plan)}


def _finish_reason(reason: str | None, called: bool, plan: ToolPlan | None) -> str | None:
    # As OpenAI: "tool_calls" when the model chose to call (auto, required); a named call ends with "stop".
    if plan is not None and called and reason == "stop" and plan.mode != "named":
        return "tool_calls"
    return reason


async def _stream(state: ServerState, rid: str, created: int, prompt_tokens: int,
                  outputs: AsyncIterator[tuple[int, RequestOutput]], first: tuple[int, RequestOutput],
                  include_usage: bool, logprobs: bool, n: int, plan: ToolPlan | None) -> AsyncIterator[str]:
    tok = state.ready_engine().tokenizer
    base: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": state.model_name, "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    completion = [0] * n
    cached = 0
    calls = [ToolCallStream(plan) if plan is not None else None for _ in range(n)]
    for i in range(n):
        yield sse(base | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]})

    try:
        async for i, out in prepend(first, outputs):
            if out.error is not None:
                raise APIError(500, out.error, type="server_error", code="internal_error")
            completion[i] = out.num_output_tokens
            cached = out.num_cached_tokens if i == 0 else cached
            stream = calls[i]
            if stream is None:
                deltas: list[dict[str, Any]] = [{"content": out.new_text}] if out.new_text else []
            else:
                deltas = stream.feed(out.new_text)
            if stream is not None and out.finished:
                deltas += stream.finish()
            if out.logprobs and not deltas:
                deltas = [{}]
            for k, delta in enumerate(deltas):
                yield sse(base | {"choices": [{
                    "index": i, "delta": delta,
                    "logprobs": chat_logprobs(tok, out.logprobs) if logprobs and k == 0 else None,
                    "finish_reason": None}]})
            if out.finished:
                reason = _finish_reason(out.finish_reason, stream is not None and stream.called, plan)
                yield sse(base | {"choices": [{"index": i, "delta": {}, "logprobs": None,
                                               "finish_reason": reason}]})
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
