"""What /openapi.json says of the POST endpoints: their request bodies and their responses.

The handlers read and validate bodies themselves (app.read_body: size and content-type checks,
OpenAI-shaped 400s instead of FastAPI's 422), so FastAPI does not see the request models: they
are declared through `openapi_extra` and added to the components here. The response models
below are documentation only: they describe, field for field, the dicts the handlers return.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route whose handler reads `model` from a JSON body."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}}


def add_request_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put the request models (and the models they use) into the generated document's components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI after the first call
        _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None when the message is only tool calls
    refusal: None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None


class InputTokensDetails(BaseModel):
    cached_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class ResponseObject(BaseModel):
    """/v1/responses: the main fields (docs/api.md lists them all)."""

    id: str
    object: Literal["response"]
    created_at: float
    status: Literal["completed", "incomplete", "failed", "cancelled", "in_progress"]
    model: str
    output: list[dict[str, Any]]
    previous_response_id: str | None
    usage: ResponseUsage | None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


_ERRORS = {
    400: "invalid request (the OpenAI error body says which parameter)",
    401: "missing or wrong API key (with --api-key)",
    404: "unknown model, or (responses) unknown response id",
    413: "body larger than --max-body-bytes",
    415: "body not application/json",
    429: "overloaded: more than --max-queue requests waiting; retry (elsewhere) after Retry-After",
    500: "a bug",
    503: "loading or the engine stopped (with Retry-After)",
}


def responses(ok: type[BaseModel], stream: bool = False, timeout: bool = False) -> dict[int | str, Any]:
    """The `responses` of a route: `ok` on 200 (or server-sent events when streaming), errors otherwise."""
    success: dict[str, Any] = {"model": ok, "description": "the result"}
    if stream:
        success["description"] = "the result; with `stream: true`, server-sent events of chunks ending in [DONE]"
        # Each event: `data` holds one chunk's JSON (or [DONE]); /v1/responses also names its `event`.
        event = {"type": "object", "required": ["data"], "properties": {
            "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
            "retry": {"type": "integer"}}}
        success["content"] = {"text/event-stream": {"schema": event}}
    errors = _ERRORS | ({504: "ran longer than --request-timeout"} if timeout else {})
    return {200: success} | {code: {"model": ErrorResponse, "description": d} for code, d in errors.items()}
