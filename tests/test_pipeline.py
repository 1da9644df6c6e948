"""The serving pipeline in process, over a scripted engine: what a response says when the engine's outputs
fail after the headers, and which output the headers describe. The real server's behaviour is in
test_server, test_responses, test_skip_serving and test_truncation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.datastructures import Headers

from strata.engine.request import Request, RequestOutput, SkipReport, SkipRequest
from strata.engine.tokenizer import Tokenizer
from strata.server.chat import chat_completions
from strata.server.errors import APIError
from strata.server.protocol import ChatCompletionRequest, ResponsesRequest
from strata.server.responses import Responses
from strata.server.sse import EventStream
from strata.server.state import ServerSettings, ServerState

MODEL = "scripted"
FIXED = SkipReport("adaskip", "e2e", ("attn9",))
WITH_EXTRA = SkipReport("adaskip", "e2e", ("attn9", "ffn13"))  # an online extra FFN decided later


def said(text: str, **kw: Any) -> RequestOutput:
    return RequestOutput("", [1], text, [], 10, 1, **kw)


class ScriptedEngine:
    """Stands in for AsyncEngine: every request gets the same outputs; which requests ended is recorded."""

    alive = True
    status = "ok"
    context_limit = 2048
    grammars = None

    shares_responses = False

    def __init__(self, tokenizer: Tokenizer, script: list[RequestOutput]) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.closed: list[str] = []
        self.records: dict[tuple[str, str], dict[str, Any]] = {}

    def check_skip(self, spec: SkipRequest) -> None:
        pass

    def check_admission(self) -> None:
        pass

    async def store_response(self, tenant: str, response_id: str, record: dict[str, Any]) -> None:
        self.records[tenant, response_id] = record

    async def stored_response(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        return self.records.get((tenant, response_id))

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        try:
            for out in self.script:
                out.request_id = request.request_id
                yield out
                await asyncio.sleep(0)
        finally:
            self.closed.append(request.request_id)


def _state(tokenizer: Tokenizer, script: list[RequestOutput]) -> tuple[ServerState, ScriptedEngine]:
    state = ServerState(ServerSettings(served_model_name=MODEL))
    engine = ScriptedEngine(tokenizer, script)
    state.engine = engine  # type: ignore[assignment]
    return state, engine


async def _events(response: EventStream) -> list[str]:
    return [chunk async for chunk in response.body_iterator]


FAILS_AFTER_A_TOKEN = [said("Hello", cache_tier="hbm", num_cached_tokens=32),
                       said("", finished=True, finish_reason="error", error="internal error: boom")]


def test_a_chat_stream_that_fails_after_its_headers_ends_with_an_error_event(tokenizer):
    state, engine = _state(tokenizer, FAILS_AFTER_A_TOKEN)
    body = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                 "stream": True})

    async def run() -> tuple[EventStream, list[str]]:
        response = await chat_completions(state, body, Headers({}), "public")
        return response, await _events(response)

    response, events = asyncio.run(run())
    assert response.headers["x-cached-tokens"] == "32" and response.headers["x-cache-tier"] == "hbm"
    assert json.loads(events[1][6:])["choices"][0]["delta"] == {"content": "Hello"}
    assert json.loads(events[-2][6:])["error"]["code"] == "internal_error" and events[-1] == "data: [DONE]\n\n"
    assert len(engine.closed) == 1


def test_a_failing_response_is_stored_failed_streamed_or_not(tokenizer):
    state, _ = _state(tokenizer, FAILS_AFTER_A_TOKEN)
    api = Responses(state)

    async def run(stream: bool) -> tuple[str, Any]:
        body = ResponsesRequest.model_validate({"model": MODEL, "input": "Hi", "stream": stream})
        if stream:
            events = await _events(await api.create(body, Headers({}), "public"))
            last = json.loads(events[-1].split("data: ", 1)[1])
            return last["type"], last["response"]
        with pytest.raises(APIError) as e:
            await api.create(body, Headers({}), "public")
        assert e.value.status == 500 and e.value.message == "internal error: boom"
        return "raised", None

    kind, response = asyncio.run(run(stream=True))
    assert kind == "response.failed" and response["status"] == "failed"
    assert response["error"]["message"] == "internal error: boom"
    assert asyncio.run(api.retrieve(response["id"], "public"))["status"] == "failed"
    assert asyncio.run(run(stream=False)) == ("raised", None)
    assert not api._running  # neither is left running


def test_headers_describe_the_first_output_of_a_stream_and_the_last_of_a_whole_response(tokenizer):
    script = [said("Hel", skip=FIXED), said("lo", skip=WITH_EXTRA, finished=True, finish_reason="stop")]
    state, _ = _state(tokenizer, script)

    async def run(stream: bool) -> dict[str, str]:
        body = ChatCompletionRequest.model_validate({"model": MODEL, "stream": stream,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
        response = await chat_completions(state, body, Headers({}), "public")
        if stream:
            await _events(response)
        return dict(response.headers)

    assert asyncio.run(run(stream=True))["x-skipped-sublayers"] == "attn9"
    assert asyncio.run(run(stream=False))["x-skipped-sublayers"] == "attn9,ffn13"
