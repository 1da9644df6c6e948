"""The serving pipeline chat, completions and responses share.

An endpoint converts its request into a `Prepared` one (off the event loop, see `prepare`) and a `Call`;
`start` resolves the session key and the skip request, admits the call and starts its choices on the engine
(which prepares a session's stored KV itself, the shared tier's included); the `Run` it returns is read
whole (`gather`) or as a stream (`outputs`, answered by `stream_response`), and says every header of the
response. The endpoint then only converts outputs into its own response shapes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TypeVar

from starlette.datastructures import Headers

from strata.engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from strata.engine.request import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.server.choices import ChoiceResult, engine_error, run_choices
from strata.server.errors import APIError
from strata.server.headers import response_headers
from strata.server.offload import off_loop
from strata.server.protocol import SkipField
from strata.server.session_key import session_key
from strata.server.skip import skip_request
from strata.server.sse import SSE_DONE, Closable, EventStream, sse
from strata.server.state import ServerState

P = TypeVar("P")
Output = tuple[int, RequestOutput]  # (choice index, output)


@dataclass(kw_only=True)
class Prepared:
    """An endpoint's request as the engine runs it: one prompt and one set of sampling parameters per choice."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    truncation: tuple[int, int] | None = None  # how the session's stored KV is cut to what the prompt kept
    dropped_tokens: int = 0  # prompt tokens dropped to fit the context


@dataclass(kw_only=True)
class Call:
    """What the pipeline reads of one API call besides its prompt: where it came from, whether it streams,
    the body fields that may name its session (after the headers) and what it asks to skip."""

    request_id: str
    headers: Headers
    tenant: str
    stream: bool
    prompt_cache_key: str | None = None
    user: str | None = None
    skip: SkipField | None = None
    keep_kv: bool = True  # False: nothing of its KV is kept after it (Responses with store: false)


async def prepare(state: ServerState, make: Callable[[AsyncEngine], P]) -> P:
    """`make(engine)` off the event loop: templates, tokens, grammars and sampling parameters are CPU work,
    and a prompt of MiBs takes seconds to tokenize."""
    return await off_loop(make, state.ready_engine())


async def start(state: ServerState, call: Call, prepared: Prepared) -> Run:
    """The call's choices running on the engine. A stream waits here for its first output: an error before
    it is a plain HTTP error, and the headers can say how much history was reused."""
    engine = state.ready_engine()
    key = session_key(call.headers, call.tenant, call.prompt_cache_key, call.user)
    skip = skip_request(state, call.skip, call.headers)
    _admit(engine)
    choices = run_choices(engine, call.request_id, prepared.prompts, prepared.params, key, prepared.truncation,
                          skip, call.tenant, call.keep_kv)
    first = await anext(choices) if call.stream else None
    return Run(choices, first, len(prepared.prompts), prepared.dropped_tokens)


def _admit(engine: AsyncEngine) -> None:
    """Refuse up front (before a stream starts) when the engine cannot take more work."""
    try:
        engine.check_admission()
    except (EngineOverloaded, EngineDead) as e:
        raise engine_error(e) from e


class Run:
    """One admitted call's choices on the engine. Closing it (a disconnect, a cancel) aborts every choice."""

    def __init__(self, choices: AsyncGenerator[Output, None], first: Output | None, n: int,
                 dropped_tokens: int) -> None:
        self._choices = choices
        self._pending = first  # a stream's first output: read before the response started, not yet yielded
        self._head = first[1] if first is not None else None
        self._last: RequestOutput | None = None  # the first choice's latest output
        self._n = n
        self._dropped_tokens = dropped_tokens

    @property
    def headers(self) -> dict[str, str]:
        """Every header of the response: a stream's from its first output (they are sent before the rest), a
        whole response's from its first choice's last (whose skip report also names the online extra FFNs)."""
        return response_headers(self._head if self._head is not None else self._last, self._dropped_tokens)

    async def outputs(self) -> AsyncGenerator[Output, None]:
        """(choice index, output) as they come; an output that carries an error raises it as a 500."""
        if self._pending is not None:
            first, self._pending = self._pending, None
            yield self._checked(first)
        async for item in self._choices:
            yield self._checked(item)

    def _checked(self, item: Output) -> Output:
        i, out = item
        if out.error is not None:
            raise APIError(500, out.error, type="server_error", code="internal_error")
        if i == 0:
            self._last = out
        return item

    async def gather(self) -> list[ChoiceResult]:
        """Every choice whole (a response that does not stream)."""
        results = [ChoiceResult() for _ in range(self._n)]
        try:
            async for i, out in self.outputs():
                results[i].add(out)
        finally:
            await self.aclose()
        return results

    async def aclose(self) -> None:
        await self._choices.aclose()


def stream_response(run: Run, events: AsyncGenerator[str, None], source: Closable | None = None) -> EventStream:
    """A streamed call's response: the endpoint's events made from `run.outputs()`, and the run's headers.

    Once the headers are gone an error can only be the stream's last event. `source` is what a disconnect
    before the events started closes (the run, unless the endpoint keeps state around it)."""
    return EventStream(_ending_with_errors(events, run), source or run, run.headers)


async def _ending_with_errors(events: AsyncGenerator[str, None], run: Run) -> AsyncGenerator[str, None]:
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield sse(e.body())
        yield SSE_DONE
    finally:
        await events.aclose()
        await run.aclose()  # a disconnect lands here: aborts every choice
