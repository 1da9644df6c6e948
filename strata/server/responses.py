"""/v1/responses: create (plain and streamed), retrieve, delete, cancel.

A response is a chat turn underneath: its input items become chat messages after those of the response it
follows (previous_response_id), tools and text.format become chat's tools and response_format, and the
chat path prepares it and the serving pipeline runs it (skip and headers as chat's). A chain of responses is
one session: its KV is kept and reused from HBM, DRAM or SSD like any session's, keyed by the chain's first
response.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncGenerator
from functools import partial
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from strata.engine.async_engine import AsyncEngine, ResponseQuotaExceeded
from strata.engine.request import RequestOutput
from strata.server.chat import PreparedChat, prepare_chat
from strata.server.errors import APIError
from strata.server.offload import off_loop
from strata.server.pipeline import Call, Run, prepare, start, stream_response
from strata.server.protocol import (
    ChatCompletionRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputMessage,
    ResponsesRequest,
)
from strata.server.sse import EventStream
from strata.server.state import ServerState
from strata.server.tool_calls import ToolCallStream, new_call_id, parse_tool_output
from strata.server.tools import ToolPlan

ROUTE_KEY_HEADER = "x-strata-route-key"
_ROUTE_KEY = re.compile(r"[0-9a-f]{16}")


def new_response_id(headers: Headers, previous_response_id: str | None) -> str:
    """resp_<route key><64 random bits>. The router (deploy/haproxy) hashes a request's route key onto its ring
    and, for a request without a session header, reads the key back out of previous_response_id: a chain of
    responses then stays on one server without any header. The key is the one the router sent this request
    by, else the chain's own, else a fresh one."""
    for key in (headers.get(ROUTE_KEY_HEADER, ""), (previous_response_id or "")[5:21]):
        if _ROUTE_KEY.fullmatch(key):
            return f"resp_{key}{secrets.token_hex(8)}"
    return f"resp_{secrets.token_hex(16)}"


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code="response_not_found")


def _input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """Input items as chat messages (consecutive function calls are one assistant message)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out: list[dict[str, Any]] = []
    for item in body.input:
        if isinstance(item, InputMessage):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def _chat_request(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": ([{"role": "system", "content": body.instructions}] if body.instructions else []) + messages,
        "parallel_tool_calls": body.parallel_tool_calls,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "user": body.user,
    }
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in body.tools]
    if body.tool_choice is not None:
        choice = body.tool_choice
        chat["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                       "function": {"name": choice.name}}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None:
        rf: dict[str, Any] = {"type": fmt.type}
        if fmt.type == "json_schema":
            rf["json_schema"] = {"name": fmt.name, "schema": fmt.schema_ or {}, "strict": fmt.strict}
        chat["response_format"] = rf
    return ChatCompletionRequest.model_validate(chat)


def _message_item(text: str, status: str, item_id: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The response's output as the chat message a follow-up's history holds."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    return {"role": "assistant", "content": text or None} | ({"tool_calls": calls} if calls else {})


CANCEL_POLL_S = 1.0  # how often a running response asks the shared store whether it was cancelled elsewhere
CANCEL_WAIT_S = 30.0  # how long a cancel waits for the response's final state


class Responses:
    """The endpoints' state: the responses running here now (so that they can be cancelled). Stored
    records live in the engine's store (expiry, quota, SSD budget, shared between servers with --remote-kv)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._running: dict[str, _Response] = {}

    # -- create ----------------------------------------------------------------------------------------

    async def create(self, body: ResponsesRequest, headers: Headers, tenant: str) -> JSONResponse | EventStream:
        state = self.state
        state.check_model(body.model)
        history: list[dict[str, Any]] = []
        root = None
        engine = state.ready_engine()
        if body.previous_response_id:
            record = await engine.stored_response(tenant, body.previous_response_id)
            if record is None:
                raise _not_found(body.previous_response_id, "previous_response_id")
            history, root = record["messages"], record["session"]
        rid = new_response_id(headers, body.previous_response_id)
        root = root or rid
        messages = history + _input_messages(body)
        chat = await off_loop(_chat_request, body, messages)  # a long history is validated off the event loop
        prep = await prepare(state, partial(prepare_chat, state, chat))
        if prep.kept_messages is not None:  # a context overflow cut the history: keep what the model saw
            messages = [messages[i] for i in prep.kept_messages]
        # The chain's first response names the session, unless the client names one itself. Without store,
        # the chain's stored KV may be read but nothing of this response is kept.
        call = Call(request_id=rid, headers=headers, tenant=tenant, stream=body.stream,
                    prompt_cache_key=f"resp_{root}", skip=body.skip, keep_kv=bool(body.store))
        response = _Response(self, rid, body, tenant, root, messages, prep, time.time())
        self._running[rid] = response  # from now on it can be cancelled, also while the first token comes
        try:
            run = await start(state, call, prep)
        except BaseException:
            response.ended()
            raise
        response.run = run
        if engine.shares_responses:
            response.watch_shared_cancel(engine)
        if body.stream:
            return stream_response(run, response.events(run), source=response)
        try:
            await response.consume(run)
            await run.aclose()
            final = await response.finish()
        finally:
            await run.aclose()
            response.ended()
        if response.failure is not None:  # stored as failed; the caller gets chat's error
            raise response.failure
        return JSONResponse(final, headers=run.headers)

    # -- retrieve, delete, cancel ------------------------------------------------------------------------

    async def retrieve(self, response_id: str, tenant: str) -> dict[str, Any]:
        record = await self.state.ready_engine().stored_response(tenant, response_id)
        if record is None:
            raise _not_found(response_id)
        return record["response"]

    async def delete(self, response_id: str, tenant: str) -> dict[str, Any]:
        if not await self.state.ready_engine().delete_stored_response(tenant, response_id):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def cancel(self, response_id: str, tenant: str) -> dict[str, Any]:
        """A running response stops at its next token and is stored as cancelled; a finished one is a 400.
        With a shared store, one running on another server is asked to stop and its final state awaited."""
        engine = self.state.ready_engine()
        response = self._running.get(response_id)
        if response is None or response.tenant != tenant:
            if await engine.stored_response(tenant, response_id) is not None:
                raise APIError(400, f"Response '{response_id}' is not running; only a running response can be "
                               "cancelled.", code="response_not_running")
            if not (engine.shares_responses and await engine.response_running_elsewhere(tenant, response_id)):
                raise _not_found(response_id)
            await engine.request_response_cancel(tenant, response_id)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline:
                record = await engine.stored_response(tenant, response_id)
                if record is not None:
                    return record["response"]
                await asyncio.sleep(0.25)
            raise APIError(504, f"Response '{response_id}' did not stop within {CANCEL_WAIT_S:g} s.",
                           type="server_error", code="cancel_timeout")
        response.cancelled.set()
        try:
            await asyncio.wait_for(response.done.wait(), timeout=30)
        except TimeoutError:
            pass
        return response.final or response.response("cancelled", response.output("cancelled"))


class _Response:
    """One response being generated: its text, calls and usage as the outputs come, and its events."""

    def __init__(self, api: Responses, rid: str, body: ResponsesRequest, tenant: str, root: str,
                 messages: list[dict[str, Any]], prep: PreparedChat, created: float) -> None:
        self.api, self.rid, self.body, self.tenant, self.root = api, rid, body, tenant, root
        self.messages, self.prep, self.created = messages, prep, created
        self.text = ""
        self.finish_reason: str | None = None
        self.output_tokens = 0
        self.cached = 0
        self.failure: APIError | None = None  # what ended the outputs early
        self.run: Run | None = None  # its choice on the engine, once started
        self.cancelled = asyncio.Event()
        self.done = asyncio.Event()  # the final state is known (and stored)
        self.final: dict[str, Any] | None = None
        self.read = False  # the outputs are being read (by consume or events), which end the response
        self._watcher: asyncio.Task[None] | None = None  # polls for a cancel made on another server

    def ended(self) -> None:
        self.done.set()
        self.api._running.pop(self.rid, None)
        if self._watcher is not None:
            self._watcher.cancel()

    def watch_shared_cancel(self, engine: AsyncEngine) -> None:
        """Let a cancel arriving at another server stop this response (polled from the shared store)."""
        async def watch() -> None:
            await engine.mark_response_running(self.tenant, self.rid, True)
            try:
                while not self.done.is_set():
                    await asyncio.sleep(CANCEL_POLL_S)
                    if await engine.response_cancel_requested(self.tenant, self.rid):
                        self.cancelled.set()
                        return
            finally:
                await asyncio.shield(engine.mark_response_running(self.tenant, self.rid, False))

        self._watcher = asyncio.create_task(watch())

    async def aclose(self) -> None:
        """The response's source, as EventStream names it: closed by a disconnect before the event stream
        started, it ends the response; otherwise whoever reads the outputs ends it once the final state is
        stored."""
        if self.run is not None:
            await self.run.aclose()
        if not self.read:
            self.ended()

    @property
    def plan(self) -> ToolPlan | None:
        return self.prep.tools

    @property
    def error(self) -> str | None:
        return self.failure.message if self.failure is not None else None

    def _take(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.output_tokens = out.num_output_tokens
        self.cached = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason

    async def consume(self, run: Run) -> None:
        self.read = True
        try:
            async for _, out in run.outputs():
                self._take(out)
                if self.cancelled.is_set():
                    return
        except APIError as e:
            self.failure = e

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        if self.cancelled.is_set() and self.finish_reason is None:
            return "cancelled"
        return "incomplete" if self.finish_reason == "length" else "completed"

    def output(self, status: str) -> list[dict[str, Any]]:
        item_status = "completed" if status == "completed" else "incomplete"
        if self.plan is None:
            content, calls = self.text, []
        else:
            content, calls = parse_tool_output(self.plan, self.text)
        items = [_message_item(content, item_status, f"msg_{uuid.uuid4().hex}")] if content or not calls else []
        items += [_call_item(f"fc_{uuid.uuid4().hex}", new_call_id(), c.name, c.arguments, item_status)
                  for c in calls]
        return items

    def response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        prompt_tokens = len(self.prep.prompt)
        choice = body.tool_choice
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "model": self.api.state.model_name, "output": output,
            "error": {"code": "server_error", "message": self.error} if self.error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls, "temperature": body.temperature, "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens, "previous_response_id": body.previous_response_id,
            "tool_choice": (choice if isinstance(choice, str) else choice.model_dump()) if choice else "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "text": {"format": fmt}, "store": body.store, "user": body.user,
            "usage": None if status == "in_progress" else {
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": 0},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + self.output_tokens,
            },
        }

    async def finish(self, output: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        status = self.status
        output = self.output(status) if output is None else output
        response = self.response(status, output)
        if self.body.store:
            record = {"response": response, "session": self.root,
                      "messages": self.messages + [_assistant_message(output)]}
            try:
                await self.api.state.ready_engine().store_response(self.tenant, self.rid, record)
            except ResponseQuotaExceeded as e:
                raise APIError(429, f"The response was not stored: {e}.", type="insufficient_quota",
                               code="insufficient_quota") from e
        self.final = response
        return response

    # -- streaming ---------------------------------------------------------------------------------------

    async def events(self, run: Run) -> AsyncGenerator[str, None]:
        """The response's events; an error among the outputs is its response.failed event."""
        seq = 0
        output: list[dict[str, Any]] = []
        message: dict[str, Any] | None = None  # the open message item
        calls: dict[int, dict[str, Any]] = {}  # tool call index -> its item

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            seq += 1
            data = {"type": kind, "sequence_number": seq - 1} | fields
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        def close_message(status: str = "completed") -> list[str]:
            nonlocal message
            if message is None:
                return []
            idx, text = output.index(message), message["content"][0]["text"]
            message["status"] = "completed" if status == "completed" else "incomplete"
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done = [event("response.output_text.done", item_id=message["id"], output_index=idx, content_index=0,
                          text=text, logprobs=[]),
                    event("response.content_part.done", item_id=message["id"], output_index=idx,
                          content_index=0, part=part),
                    event("response.output_item.done", output_index=idx, item=message)]
            message = None
            return done

        def on_delta(delta: dict[str, Any]) -> list[str]:
            nonlocal message
            evs: list[str] = []
            if delta.get("content"):
                if message is None:
                    message = _message_item("", "in_progress", f"msg_{uuid.uuid4().hex}")
                    message["content"] = []
                    output.append(message)
                    idx = len(output) - 1
                    evs.append(event("response.output_item.added", output_index=idx, item=message | {"content": []}))
                    message["content"] = [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]
                    evs.append(event("response.content_part.added", item_id=message["id"], output_index=idx,
                                     content_index=0, part=message["content"][0]))
                message["content"][0]["text"] += delta["content"]
                evs.append(event("response.output_text.delta", item_id=message["id"],
                                 output_index=output.index(message), content_index=0, delta=delta["content"],
                                 logprobs=[]))
            for tc in delta.get("tool_calls", []):
                if "id" in tc:
                    evs += close_message()
                    item = _call_item(f"fc_{uuid.uuid4().hex}", tc["id"], tc["function"]["name"], "", "in_progress")
                    calls[tc["index"]] = item
                    output.append(item)
                    evs.append(event("response.output_item.added", output_index=len(output) - 1, item=dict(item)))
                piece = tc["function"].get("arguments", "")
                if piece:
                    item = calls[tc["index"]]
                    item["arguments"] += piece
                    evs.append(event("response.function_call_arguments.delta", item_id=item["id"],
                                     output_index=output.index(item), delta=piece))
            return evs

        self.read = True
        stream = ToolCallStream(self.plan) if self.plan is not None else None
        try:
            yield event("response.created", response=self.response("in_progress", []))
            yield event("response.in_progress", response=self.response("in_progress", []))
            try:
                async for _, out in run.outputs():
                    self._take(out)
                    deltas = [{"content": out.new_text}] if stream is None else stream.feed(out.new_text)
                    if stream is not None and out.finished:
                        deltas += stream.finish()
                    for delta in deltas:
                        for ev in on_delta(delta):
                            yield ev
                    if self.cancelled.is_set():
                        break
            except APIError as e:
                self.failure = e
            finally:
                await run.aclose()  # a disconnect or a cancel lands here: aborts the engine request
            status = self.status
            for ev in close_message(status):
                yield ev
            for item in calls.values():
                item["status"] = "completed" if status == "completed" else "incomplete"
                idx = output.index(item)
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                            arguments=item["arguments"], name=item["name"])
                yield event("response.output_item.done", output_index=idx, item=item)
            response = await self.finish(output)
            final = {"completed": "response.completed", "failed": "response.failed"}.get(status,
                                                                                          "response.incomplete")
            yield event(final, response=response)
        finally:
            self.ended()
