"""The FastAPI application: routes, auth, body parsing and error mapping. HTTP only."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from strata import __version__
from strata.engine.async_engine import AsyncEngine
from strata.engine.tokenizer import ChatTemplateError, InvalidText, Tokenizer
from strata.server.chat import chat_completions
from strata.server.completions import completions
from strata.server.disconnect import guarded
from strata.server.errors import APIError, bad_request
from strata.server.metrics import metrics_text
from strata.server.offload import off_loop
from strata.server.openapi import (
    ChatCompletion,
    Completion,
    DetokenizeResponse,
    ResponseDeleted,
    ResponseObject,
    TokenizeResponse,
    add_request_schemas,
    request_body,
    responses,
)
from strata.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from strata.server.responses import Responses
from strata.server.session_key import tenant_of
from strata.server.sessions import session_router
from strata.server.state import ServerSettings, ServerState

log = logging.getLogger(__name__)
B = TypeVar("B", bound=BaseModel)
OPEN_PATHS = {"/health", "/metrics", "/version"}
EXIT_MODEL_LOAD_FAILED = 3
OFF_LOOP_BODY = 64 * 2**10  # bodies larger than this are parsed and validated off the event loop


def _load_engine(state: ServerState) -> None:
    try:
        ae = AsyncEngine.load(state.settings.engine)
        state.model_name = state.model_name or ae.model_name
        ae.start()
        state.engine = ae
        log.info("ready: serving %s", state.model_name)
    except Exception as e:
        log.exception("loading the model failed")
        state.load_error = f"loading the model failed: {e}"
        # A server that cannot load its model never will: exit non-zero so the supervisor sees it (rather
        # than answering /health 503 forever).
        logging.shutdown()
        os._exit(EXIT_MODEL_LOAD_FAILED)


async def read_body(request: Request, model: type[B], limit: int) -> B:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}.",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect as e:  # gone before it finished sending: nobody reads the answer
        raise APIError(499, "The client closed the request.", code="client_closed_request") from e
    raw = b"".join(chunks)
    if len(raw) > OFF_LOOP_BODY:  # parsing MiBs of JSON would stall every other request
        return await off_loop(_parse_body, raw, model)
    return _parse_body(raw, model)


def _parse_body(raw: bytes, model: type[B]) -> B:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise bad_request(f"Invalid request: {param}: {err['msg']}" if param else err["msg"],
                          param=param) from e


# /tokenize and /detokenize run off the event loop, rendering their (possibly large) JSON answers too.
def _tokenized(body: TokenizeRequest, tok: Tokenizer, context_limit: int) -> JSONResponse:
    if body.messages is not None:
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tok.encode_chat(msgs, body.add_generation_prompt)
        except ChatTemplateError as e:
            raise bad_request(str(e), param="messages") from e
    else:
        ids = tok.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": context_limit})


def _detokenized(body: DetokenizeRequest, tok: Tokenizer) -> JSONResponse:
    if any(t >= tok.vocab_size for t in body.tokens):
        raise bad_request(f"token ids must be below the vocabulary size {tok.vocab_size}", param="tokens")
    return JSONResponse({"prompt": tok.decode(body.tokens, skip_special_tokens=False)})


def build_app(settings: ServerSettings) -> FastAPI:
    state = ServerState(settings)
    keys = [k for k in (settings.api_key or "").split(",") if k]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background so /health can answer 503 while the model loads.
        threading.Thread(target=_load_engine, args=(state,), name="strata-load", daemon=True).start()
        yield
        if state.engine is not None:  # in-flight requests had --shutdown-timeout already (uvicorn's graceful stop)
            state.engine.shutdown(timeout=state.settings.shutdown_timeout)

    app = FastAPI(title="strata", version=__version__, lifespan=lifespan)
    app.state.strata = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(InvalidText)
    async def _invalid_text(_: Request, e: InvalidText) -> JSONResponse:
        return bad_request(str(e)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return bad_request(f"Invalid request: {e.errors()[0]['msg']}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"Internal server error: {type(e).__name__}", type="server_error",
                        code="internal_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        token = None
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if keys and request.url.path not in OPEN_PATHS and token not in keys:
            return APIError(401, "Invalid or missing API key. Send it as 'Authorization: Bearer KEY'.",
                            code="invalid_api_key").response()
        request.state.tenant = tenant_of(token if keys else None)
        return await call_next(request)

    limit = settings.max_body_bytes

    timeout = settings.request_timeout

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=request_body(ChatCompletionRequest),
              responses=responses(ChatCompletion, stream=True, timeout=True))
    async def _chat(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest, limit)
        return await guarded(request, timeout, chat_completions(state, body, request.headers, request.state.tenant))

    @app.post("/v1/completions", response_model=None, openapi_extra=request_body(CompletionRequest),
              responses=responses(Completion, stream=True, timeout=True))
    async def _completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest, limit)
        return await guarded(request, timeout, completions(state, body, request.headers, request.state.tenant))

    stored = Responses(state)

    @app.post("/v1/responses", response_model=None, openapi_extra=request_body(ResponsesRequest),
              responses=responses(ResponseObject, stream=True, timeout=True))
    async def _create_response(request: Request) -> Response:
        body = await read_body(request, ResponsesRequest, limit)
        return await guarded(request, timeout, stored.create(body, request.headers, request.state.tenant))

    @app.get("/v1/responses/{response_id}", response_model=None, responses=responses(ResponseObject))
    async def _get_response(request: Request, response_id: str) -> Response:
        return JSONResponse(await stored.retrieve(response_id, request.state.tenant))

    @app.delete("/v1/responses/{response_id}", response_model=None, responses=responses(ResponseDeleted))
    async def _delete_response(request: Request, response_id: str) -> Response:
        return JSONResponse(await stored.delete(response_id, request.state.tenant))

    @app.post("/v1/responses/{response_id}/cancel", response_model=None, responses=responses(ResponseObject))
    async def _cancel_response(request: Request, response_id: str) -> Response:
        return JSONResponse(await stored.cancel(response_id, request.state.tenant))

    def _model_card() -> dict[str, Any]:
        ae = state.ready_engine()
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "strata",
                "max_model_len": ae.context_limit}

    @app.get("/v1/models")
    async def _models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def _model(model_id: str) -> dict[str, Any]:
        state.ready_engine()
        state.check_model(model_id)
        return _model_card()

    @app.post("/tokenize", response_model=None, openapi_extra=request_body(TokenizeRequest),
              responses=responses(TokenizeResponse))
    async def _tokenize(request: Request) -> Response:
        body = await read_body(request, TokenizeRequest, limit)
        state.check_model(body.model)
        engine = state.ready_engine()
        return await off_loop(_tokenized, body, engine.tokenizer, engine.context_limit)

    @app.post("/detokenize", response_model=None, openapi_extra=request_body(DetokenizeRequest),
              responses=responses(DetokenizeResponse))
    async def _detokenize(request: Request) -> Response:
        body = await read_body(request, DetokenizeRequest, limit)
        state.check_model(body.model)
        return await off_loop(_detokenized, body, state.ready_engine().tokenizer)

    app.include_router(session_router(state))
    add_request_schemas(app, [ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest,
                              ResponsesRequest])

    @app.get("/health")
    async def _health() -> Response:
        ae = state.engine
        if ae is not None and ae.alive:
            return JSONResponse({"status": "ok"})
        reason = state.load_error or ("loading" if ae is None else ae.status)
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(metrics_text(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def _version() -> dict[str, str]:
        return {"version": __version__}

    return app
