"""The session key of a request: first found of X-Session-ID, X-User-ID, prompt_cache_key, user;
scoped by tenant so one API key never reaches another key's sessions."""

from __future__ import annotations

import hashlib

from starlette.datastructures import Headers


def tenant_of(api_key: str | None) -> str:
    if not api_key:
        return "public"
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def session_key(headers: Headers, tenant: str, prompt_cache_key: str | None, user: str | None) -> str | None:
    for candidate in (headers.get("x-session-id"), headers.get("x-user-id"), prompt_cache_key, user):
        if candidate:
            return f"{tenant}/{candidate}"
    return None
