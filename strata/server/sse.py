"""Server-sent events framing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi.responses import StreamingResponse


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Closable(Protocol):
    async def aclose(self) -> None: ...


class EventStream(StreamingResponse):
    """An SSE response whose events are made from `source`, the request's engine outputs.

    `source` is named so that it can be closed (which aborts the engine requests) even when the
    events are never read: Starlette drops a body it has not started when the client leaves
    first, and an async generator that never started runs no `finally`.
    """

    def __init__(self, events: AsyncIterator[str], source: Closable, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"} | headers)
        self.source = source
