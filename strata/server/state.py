"""What the HTTP layer holds: settings and, once loaded, the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from strata.engine.async_engine import AsyncEngine
from strata.engine.config import EngineConfig
from strata.server.errors import APIError


@dataclass
class ServerSettings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    shutdown_timeout: float = 30.0
    context_overflow: str = "truncate"  # or "error": a chat prompt too long for the context is a 400
    request_timeout: float | None = None  # seconds a chat/completions request may run; None: no limit
    tool_call_parser: str | None = None  # the format tool calls are read in; None: from the chat template


class ServerState:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.model_name = settings.served_model_name or ""
        self.created = int(time.time())

    def ready_engine(self) -> AsyncEngine:
        if self.engine is None or not self.engine.alive:
            reason = self.load_error or ("the model is still loading" if self.engine is None else self.engine.status)
            raise APIError(503, f"The server is not ready: {reason}", type="server_error",
                           code="not_ready", headers={"Retry-After": "5"})
        return self.engine

    def check_model(self, model: str | None) -> None:
        self.ready_engine()  # the model's name is known once it has loaded
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")
