"""The engine's asynchronous front: `generate()` streams outputs while the engine loop runs in its own thread.

The loop thread owns the engine; other threads only post to its inbox, so the
scheduler and the KV cache need no locks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from strata.engine.llm_engine import LLMEngine, RequestRejected
from strata.engine.request import Request, RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineOverloaded(RuntimeError):
    pass


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="strata-engine", daemon=True)
        self.alive = False

    def start(self) -> None:
        self.alive = True
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, the last with `finished` set. Leaving early aborts the request."""
        self.check_admission()
        rid = request.request_id
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._streams_lock:
            self._streams[rid] = (asyncio.get_running_loop(), stream)
        self._post("add", request)
        finished = False
        try:
            while True:
                out = await stream.get()
                if out.error is not None and out.finish_reason == "rejected":
                    raise RequestRejected(out.error)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def check_admission(self) -> None:
        if not self.alive:
            raise EngineDead("the engine is not running")
        if self.engine.num_waiting >= self.engine.config.max_queue:
            raise EngineOverloaded("too many requests are waiting")

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread (which owns the engine) and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except Exception as e:
                loop.call_soon_threadsafe(future.set_exception, e)
            else:
                loop.call_soon_threadsafe(future.set_result, result)

        self._post("call", run)
        return await future

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def _post(self, kind: str, item: Any) -> None:
        self._inbox.put((kind, item))
        self._wake.set()

    def _deliver(self, out: RequestOutput) -> None:
        with self._streams_lock:
            target = self._streams.get(out.request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(item)
                except RequestRejected as e:
                    self._deliver(RequestOutput(item.request_id, [], "", [], len(item.prompt_ids), 0,
                                                finished=True, finish_reason="rejected", error=str(e)))
            elif kind == "abort":
                self.engine.abort(item)
            elif kind == "call":
                item()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug: fail the requests in flight, keep serving new ones
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"internal error: {e}")
            for out in outputs:
                self._deliver(out)
        for out in self.engine.fail_all("the server is shutting down"):
            self._deliver(out)
        self.engine.close()
        self.alive = False
