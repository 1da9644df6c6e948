"""Session admin endpoints: list, inspect and delete a tenant's stored session KV."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from strata.server.errors import APIError
from strata.server.state import ServerState


def session_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    def _key(request: Request, session_id: str) -> str:
        return f"{request.state.tenant}/{session_id}"

    @router.get("/v1/sessions")
    async def _list(request: Request) -> dict[str, Any]:
        prefix = f"{request.state.tenant}/"
        keys = await state.ready_engine().list_sessions(prefix)
        return {"object": "list", "data": [{"id": k[len(prefix):], "object": "session"} for k in keys]}

    @router.get("/v1/sessions/{session_id}")
    async def _get(request: Request, session_id: str) -> dict[str, Any]:
        key = _key(request, session_id)
        info = await state.ready_engine().session_info(key)
        if info is None:
            raise APIError(404, f"No stored session {session_id!r}.", param="session_id", code="session_not_found")
        info.pop("session_key", None)
        return {"id": session_id, "object": "session", **info}

    @router.post("/v1/sessions/{session_id}/pin")
    async def _pin(request: Request, session_id: str) -> dict[str, Any]:
        """Keep the session's KV regardless of LRU for `seconds` (body `{"seconds": N}`, default one hour)."""
        key = _key(request, session_id)
        try:
            seconds = float((await request.json()).get("seconds", 3600.0)) if await request.body() else 3600.0
        except (ValueError, TypeError, AttributeError) as e:
            raise APIError(400, "Body must be a JSON object like {\"seconds\": 600}.", param="seconds") from e
        if not 0 <= seconds <= 30 * 86400:
            raise APIError(400, "seconds must be between 0 and 2592000.", param="seconds")
        found = await state.ready_engine().pin_session(key, seconds)
        if not found:
            raise APIError(404, f"No stored session {session_id!r}.", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session.pinned", "seconds": seconds}

    @router.delete("/v1/sessions/{session_id}")
    async def _delete(request: Request, session_id: str) -> dict[str, Any]:
        key = _key(request, session_id)
        deleted = await state.ready_engine().delete_session(key)
        if not deleted:
            raise APIError(404, f"No stored session {session_id!r}.", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    return router
