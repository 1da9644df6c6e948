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
        keys = await state.ready_engine().call(lambda e: e.list_sessions(prefix))
        return {"object": "list", "data": [{"id": k[len(prefix):], "object": "session"} for k in keys]}

    @router.get("/v1/sessions/{session_id}")
    async def _get(request: Request, session_id: str) -> dict[str, Any]:
        key = _key(request, session_id)
        info = await state.ready_engine().call(lambda e: e.session_info(key))
        if info is None:
            raise APIError(404, f"No stored session {session_id!r}.", param="session_id", code="session_not_found")
        info.pop("session_key", None)
        return {"id": session_id, "object": "session", **info}

    @router.delete("/v1/sessions/{session_id}")
    async def _delete(request: Request, session_id: str) -> dict[str, Any]:
        key = _key(request, session_id)
        deleted = await state.ready_engine().call(lambda e: e.delete_session(key))
        if not deleted:
            raise APIError(404, f"No stored session {session_id!r}.", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    return router
