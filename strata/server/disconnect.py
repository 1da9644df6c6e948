"""End a request's work when its client goes away or it runs past --request-timeout.

Left alone, nobody notices a client that leaves while its request waits on the engine: a
non-streaming handler awaits the whole generation, a streaming one its first token before any
response exists, and uvicorn's send() after a disconnect quietly does nothing (Starlette only
stops a stream itself under ASGI spec < 2.4, by listening on `receive`). So the handler runs as
a task while a watcher reads the ASGI `receive` channel; a disconnect or the deadline cancels
that task, then the task producing the stream's chunks (started as soon as the handler returns,
since a client may leave before Starlette reads the body). Leaving AsyncEngine.generate early
aborts the engine request; a stream's source of outputs is closed when its producer is done,
even if it never started.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.types import Receive

from strata.server.errors import APIError
from strata.server.sse import SSE_DONE, EventStream, sse

T = TypeVar("T")
_END = object()
_tasks: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks


def _keep(task: asyncio.Task) -> asyncio.Task:
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


class Guard:
    """One request's watcher: cancels the current piece of work on disconnect or timeout."""

    def __init__(self, receive: Receive, timeout: float | None) -> None:
        self.timeout = timeout
        self.reason: str | None = None  # "disconnect" or "timeout" once it has ended the work
        self._work: asyncio.Task | None = None
        self._watcher = _keep(asyncio.create_task(self._watch(receive)))
        self._timer = asyncio.get_running_loop().call_later(timeout, self._end, "timeout") if timeout else None

    async def _watch(self, receive: Receive) -> None:
        # The body has been read: what comes now is http.disconnect, when the client goes.
        while (await receive())["type"] != "http.disconnect":
            pass
        self._end("disconnect")

    def _end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            if self._work is not None:
                self._work.cancel()

    def _start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        self._work = _keep(asyncio.create_task(coro))
        if self.reason is not None:
            self._work.cancel()
        return self._work

    def close(self) -> None:
        self._watcher.cancel()
        if self._timer is not None:
            self._timer.cancel()

    def error(self) -> APIError:
        if self.reason == "timeout":
            return APIError(504, f"The request ran longer than the server's request timeout of {self.timeout:g} s.",
                            type="server_error", code="request_timeout")
        return APIError(499, "The client closed the request.", code="client_closed_request")  # nobody reads it

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """The handler's result, or the guard's error when it ended the handler."""
        task = self._start(coro)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.reason is None or (current is not None and current.cancelling()):
                raise  # cancelled from outside (shutdown), not by this guard
            raise self.error() from None

    def stream(self, response: EventStream) -> AsyncIterator[Any]:
        """The response's events, produced from now on in a task of their own so that the guard can end
        it at any await. Once that task is done, for whatever reason, the response's source is closed."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        events, source = response.body_iterator, response.source

        async def produce() -> None:
            try:
                async for chunk in events:
                    queue.put_nowait(chunk)
            except Exception as e:  # a bug: re-raised where the response is sent
                queue.put_nowait(e)
            finally:
                queue.put_nowait(_END)

        task = self._start(produce())

        def done(_: asyncio.Task[None]) -> None:
            # Runs even for a task cancelled before its first step (a timeout that fired just before it
            # started), whose finally never runs: the forwarder must still see the end.
            queue.put_nowait(_END)
            _keep(asyncio.ensure_future(source.aclose()))

        task.add_done_callback(done)
        return self._forward(queue, task)

    async def _forward(self, queue: asyncio.Queue[Any], task: asyncio.Task[None]) -> AsyncIterator[Any]:
        try:
            while (chunk := await queue.get()) is not _END:
                if isinstance(chunk, Exception):
                    raise chunk
                yield chunk
            if self.reason == "timeout":  # headers are gone: the error is the stream's last event
                yield sse(self.error().body())
                yield SSE_DONE
        finally:
            task.cancel()  # the client left (or Starlette closed us): end the engine requests
            self.close()


async def guarded(request: Request, timeout: float | None, handler: Coroutine[Any, Any, Response]) -> Response:
    """Run a chat or completions handler (its body already read) under a Guard, its stream too."""
    guard = Guard(request.receive, timeout)
    try:
        response = await guard.run(handler)
    except BaseException:
        guard.close()
        raise
    if isinstance(response, EventStream):
        response.body_iterator = guard.stream(response)
    else:
        guard.close()
    return response
