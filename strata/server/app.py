"""The FastAPI application: routes, auth, body parsing and error mapping. HTTP only."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from strata import __version__
from strata.engine.async_engine import AsyncEngine
from strata.engine.llm_engine import LLMEngine
from strata.server.chat import chat_completions
from strata.server.completions import completions
from strata.server.errors import APIError, bad_request
from strata.server.metrics import metrics_text
from strata.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from strata.server.session_key import tenant_of
from strata.server.sessions import session_router
from strata.server.state import ServerSettings, ServerState

log = logging.getLogger(__name__)
B = TypeVar("B", bound=BaseModel)
OPEN_PATHS = {"/health", "/metrics", "/version"}


def _load_engine(state: ServerState) -> None:
    try:
        engine = LLMEngine(state.settings.engine)
        state.model_name = state.model_name or engine.files.name
        ae = AsyncEngine(engine)
        ae.start()
        state.engine = ae
        log.info("ready: serving %s", state.model_name)
    except Exception as e:
        log.exception("loading the model failed")
        state.load_error = f"loading the model failed: {e}"


async def read_body(request: Request, model: type[B], limit: int) -> B:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}.",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
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


def build_app(settings: ServerSettings) -> FastAPI:
    state = ServerState(settings)
    keys = [k for k in (settings.api_key or "").split(",") if k]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background so /health can answer 503 while the model loads.
        threading.Thread(target=_load_engine, args=(state,), name="strata-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="strata", version=__version__, lifespan=lifespan)
    app.state.strata = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

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

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest, limit)
        return await chat_completions(state, body, request.headers, request.state.tenant)

    @app.post("/v1/completions")
    async def _completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest, limit)
        return await completions(state, body, request.headers, request.state.tenant)

    def _model_card() -> dict[str, Any]:
        ae = state.ready_engine()
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "strata",
                "max_model_len": ae.engine.context_limit}

    @app.get("/v1/models")
    async def _models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def _model(model_id: str) -> dict[str, Any]:
        state.ready_engine()
        state.check_model(model_id)
        return _model_card()

    @app.post("/tokenize")
    async def _tokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request, TokenizeRequest, limit)
        state.check_model(body.model)
        tok = state.ready_engine().engine.tokenizer
        if body.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = tok.encode_chat(msgs, body.add_generation_prompt)
        else:
            ids = tok.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.ready_engine().engine.context_limit}

    @app.post("/detokenize")
    async def _detokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request, DetokenizeRequest, limit)
        state.check_model(body.model)
        tok = state.ready_engine().engine.tokenizer
        if any(t >= tok.vocab_size for t in body.tokens):
            raise bad_request(f"token ids must be below the vocabulary size {tok.vocab_size}", param="tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

    app.include_router(session_router(state))

    @app.get("/health")
    async def _health() -> Response:
        ae = state.engine
        if ae is not None and ae.alive:
            return JSONResponse({"status": "ok"})
        reason = state.load_error or ("loading" if ae is None else "engine stopped")
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(metrics_text(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def _version() -> dict[str, str]:
        return {"version": __version__}

    return app
