"""Content addresses of stored KV: a hash chain over a prompt's whole chunks, scoped by tenant.

The KV of a chunk of tokens depends on every token before it, so a chunk's address covers them all: the
digest of chunk ``i`` hashes its scope, the digest of chunk ``i - 1`` (its parent) and its own tokens, as
vLLM's block hashes and LMCache's chunk keys do. Two sessions whose prompts start with the same tokens
therefore name the same chunks, and one copy serves both.

The scope is the tenant: the part of the session key before its first ``/`` (keys are ``TENANT/ID``,
see the server's session_key). A key without one gets no scope and shares nothing. The tenant is inside
every digest, so one API key never reaches another's chunks, not even by guessing their tokens.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROOT = ""  # the parent of a session's first chunk


def scope_of(session_key: str) -> str | None:
    """The sharing scope of a session key: its tenant, or None (shares nothing)."""
    scope, sep, rest = session_key.partition("/")
    return scope if sep and scope and rest else None


def content_digest(scope: str, parent: str, token_ids: list[int]) -> str:
    h = hashlib.sha256()
    h.update(scope.encode())
    h.update(b"\0")
    h.update(parent.encode())
    h.update(b"\0")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def prompt_digests(scope: str, prompt_ids: list[int], chunk_tokens: int, limit: int | None = None) -> list[str]:
    """Digests of the prompt's whole chunks, first to last (at most ``limit``)."""
    out: list[str] = []
    parent = ROOT
    count = len(prompt_ids) // chunk_tokens
    for i in range(count if limit is None else min(count, limit)):
        parent = content_digest(scope, parent, prompt_ids[i * chunk_tokens:(i + 1) * chunk_tokens])
        out.append(parent)
    return out
