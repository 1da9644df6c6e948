"""POST /v1/chat/completions."""

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
from strata.engine.grammar import Grammar, GrammarCompiler
from strata.engine.tokenizer import ChatTemplateError, Tokenizer
from strata.server.errors import bad_request
from strata.server.logprobs import chat_logprobs
from strata.server.overflow import Fitted, completion_reserve, fit_messages
from strata.server.pipeline import Call, Prepared, Run, prepare, start, stream_response
from strata.server.protocol import ChatCompletionRequest
from strata.server.sampling import max_new_tokens, sampling_params
from strata.server.sse import SSE_DONE, EventStream, sse
from strata.server.state import ServerState
from strata.server.structured import compile_spec, output_grammar, requested_spec
from strata.server.tool_calls import ToolCallStream, new_call_id, parse_tool_output
from strata.server.tools import ToolPlan, template_messages, tool_grammar, tool_plan
from strata.server.usage import usage


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


@dataclass(kw_only=True)
class PreparedChat(Prepared):
    """Every choice has the conversation's prompt."""

    tools: ToolPlan | None  # the tools the model may or must call
    kept_messages: list[int] | None = None  # after a context-overflow cut: which messages the model saw

    @property
    def prompt(self) -> list[int]:
        return self.prompts[0]


def prepare_chat(state: ServerState, body: ChatCompletionRequest, engine: AsyncEngine) -> PreparedChat:
    """Template, tokens, context fitting, grammar and sampling parameters: CPU work, run off the event loop."""
    tok, limit = engine.tokenizer, engine.context_limit
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
    grammar = _grammar(body, plan, engine.grammars)
    params = [sampling_params(body, max_tokens=max_tokens, vocab_size=tok.vocab_size, logprobs=body.logprobs,
                              top_logprobs=body.top_logprobs or 0, choice=i, grammar=grammar)
              for i in range(body.n)]
    if plan is not None and plan.mode == "auto" and plan.parser == "mistral":
        for p in params:
            p.skip_special_tokens = False  # [TOOL_CALLS] is a special token: the parser must see it
    return PreparedChat(prompts=[prompt] * body.n, params=params, truncation=fitted.truncation if fitted else None,
                        dropped_tokens=fitted.dropped_tokens if fitted else 0, tools=plan,
                        kept_messages=fitted.kept if fitted else None)


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
    tok = state.ready_engine().tokenizer
    prep = await prepare(state, partial(prepare_chat, state, body))
    call = Call(request_id=f"chatcmpl-{uuid.uuid4().hex}", headers=headers, tenant=tenant, stream=body.stream,
                prompt_cache_key=body.prompt_cache_key, user=body.user, skip=body.skip)
    created = int(time.time())
    run = await start(state, call, prep)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(run, _chunks(state, tok, call.request_id, created, prep, run, include_usage,
                                            body.logprobs, body.n))

    results = await run.gather()
    choices = [
        {
            "index": i,
            "logprobs": chat_logprobs(tok, r.logprobs) if body.logprobs else None,
        } | _message(r.text, r.finish_reason, prep.tools)
        for i, r in enumerate(results)
    ]
    totals = usage(len(prep.prompt), sum(r.num_output_tokens for r in results), results[0].num_cached_tokens)
    return JSONResponse({
        "id": call.request_id, "object": "chat.completion", "created": created, "model": state.model_name,
        "choices": choices, "usage": totals, "system_fingerprint": None,
    }, headers=run.headers)


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


async def _chunks(state: ServerState, tok: Tokenizer, rid: str, created: int, prep: PreparedChat, run: Run,
                  include_usage: bool, logprobs: bool, n: int) -> AsyncGenerator[str, None]:
    """The stream's chunks; an error among the outputs ends it (see stream_response)."""
    plan = prep.tools
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

    async for i, out in run.outputs():
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
    if include_usage:
        yield sse(base | {"choices": [], "usage": usage(len(prep.prompt), sum(completion), cached)})
    yield SSE_DONE
