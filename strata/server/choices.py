"""Run the n choices of one API request on the engine and merge their outputs as they come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from strata.engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded, RequestRejected
from strata.engine.request import Request, RequestOutput, SkipReport, SkipRequest, TokenLogprob
from strata.engine.sampling_params import SamplingParams
from strata.server.errors import APIError, bad_request


@dataclass
class ChoiceResult:
    """One choice gathered whole (non-streaming responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    cache_tier: str | None = None
    skip: SkipReport | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.cache_tier = out.cache_tier
        self.skip = out.skip  # the last one also names the request's online extra FFNs
        if out.finished:
            self.finish_reason = out.finish_reason


def engine_error(e: Exception) -> APIError:
    """The engine's refusal as the HTTP error it answers (anything else is re-raised: a bug)."""
    if isinstance(e, RequestRejected):
        return bad_request(str(e))
    if isinstance(e, EngineOverloaded):
        # 429, not 503: a full queue is momentary and this pod is healthy, so the router retries the request
        # on another pod without marking this one down (503 stays for not ready, draining and dead).
        return APIError(429, f"The server is overloaded: {e}. Retry later.", type="server_error",
                        code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, EngineDead):
        return APIError(503, str(e), type="server_error", code="engine_unavailable",
                        headers={"Retry-After": "5"})
    raise e


async def run_choices(
    engine: AsyncEngine,
    request_id: str,
    prompts: list[list[int]],
    params: list[SamplingParams],
    session_key: str | None,
    truncation: tuple[int, int] | None = None,
    skip: SkipRequest | None = None,
    tenant: str = "public",
    keep_kv: bool = True,
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Yields (choice index, output). Leaving early (disconnect) aborts every choice."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, req: Request) -> None:
        try:
            async for out in engine.generate(req):
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    # Only the first choice continues the session: one conversation has one history.
    tasks = [
        asyncio.create_task(pump(i, Request(f"{request_id}-{i}", prompt, p, session_key if i == 0 else None,
                                            skip=skip, truncation=truncation if i == 0 else None,
                                            tenant=tenant, keep_kv=keep_kv)))
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
    ]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise engine_error(item) if isinstance(item, Exception) else item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
