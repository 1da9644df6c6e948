"""The engine's asynchronous front: `generate()` streams outputs while the engine loop runs in its own thread.

The loop thread owns the engine; other threads only post to its inbox, so the
scheduler and the KV cache need no locks. What it shows the outside (/metrics)
it publishes as a snapshot.

Failures stay as small as they can: a request whose sampling or text fails ends
alone (LLMEngine.step), a failed forward pass ends the requests of that batch,
and only repeated failures, or anything that ends the thread, mark the engine
dead: then every open request ends with an error at once, new ones get 503 and
/health says why.

It is the server's one door to the engine: besides generate and abort it names what the server may read
(tokenizer, grammars, context limit, skip checks) and the session admin it may do, so that nothing above
reaches into LLMEngine. The errors the server maps are EngineOverloaded, EngineDead and RequestRejected.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from strata.engine.config import EngineConfig
from strata.engine.grammar import GrammarCompiler
from strata.engine.llm_engine import LLMEngine, RequestRejected
from strata.engine.request import Request, RequestOutput, SkipRequest
from strata.engine.stats import EngineSnapshot
from strata.engine.tokenizer import Tokenizer
from strata.storage.response_records import RecordQuotaExceeded as ResponseQuotaExceeded  # noqa: F401 (for the server)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_STEP_FAILURES = 3  # consecutive failed steps that mark the engine dead
SNAPSHOT_EVERY_S = 0.2
IDLE_WAIT_S = 1.0
STALLED_WAIT_S = 0.005  # work queued but nothing could run this step (blocks, loads): don't spin
WATCHDOG_S = 0.5  # how often a waiting stream checks that the engine thread still lives


class EngineOverloaded(RuntimeError):
    pass


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        engine.wake = self._wake.set  # a session request the store has prepared can be scheduled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="strata-engine", daemon=True)
        self._started = False
        self.dead_reason: str | None = None
        self.heartbeat = time.monotonic()  # last turn of the engine loop
        self.snapshot: EngineSnapshot = engine.snapshot(0)

    @property
    def alive(self) -> bool:
        return self._started and self.dead_reason is None and self._thread.is_alive()

    @property
    def status(self) -> str:
        """Why the engine cannot serve ("ok" when it can)."""
        if self.alive:
            return "ok"
        if not self._started:
            return "starting"
        return self.dead_reason or "the engine thread ended"

    @classmethod
    def load(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model and build its engine (seconds to minutes); start() runs it."""
        return cls(LLMEngine(config))

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking work, end what is in flight, write back the tiers (within `timeout` seconds)."""
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
                # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that arrives as the item
                # does, and a cancelled request (timeout, disconnect) would then go on generating unread.
                getter = asyncio.ensure_future(stream.get())
                try:
                    done, _ = await asyncio.wait({getter}, timeout=WATCHDOG_S)
                finally:
                    if not getter.done():
                        getter.cancel()
                if not done:
                    if not self.alive and stream.empty():  # the thread ended without telling us
                        raise EngineDead(f"the engine stopped: {self.status}") from None
                    continue
                out = getter.result()
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
            raise EngineDead(f"the engine is not running: {self.status}")
        if self.snapshot.waiting >= self._engine.config.max_queue:
            raise EngineOverloaded("too many requests are waiting")

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread (which owns the engine) and return its result."""
        if not self.alive:
            raise EngineDead(f"the engine is not running: {self.status}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn(self._engine)
            except Exception as e:
                loop.call_soon_threadsafe(future.set_exception, e)
            else:
                loop.call_soon_threadsafe(future.set_result, result)

        self._post("call", run)
        return await future

    # ------------------------------------------------------------------ what the server reads
    # Fixed once the model is loaded, so any thread may read them (the server tokenizes off the event loop).

    @property
    def model_name(self) -> str:
        return self._engine.files.name

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    @property
    def grammars(self) -> GrammarCompiler:
        return self._engine.grammars

    @property
    def context_limit(self) -> int:
        """The longest sequence (prompt and completion) one request may hold."""
        return self._engine.context_limit

    def check_skip(self, spec: SkipRequest) -> None:
        """Raise SkipRejected unless the engine can serve this skip request."""
        self._engine.check_skip(spec)

    # ------------------------------------------------------------------ session admin

    async def list_sessions(self, prefix: str) -> list[str]:
        """Keys of the stored sessions (any tier) that start with `prefix`."""
        return await self._call(lambda e: e.list_sessions(prefix))

    async def session_info(self, key: str) -> dict[str, Any] | None:
        """Where a session's KV is and how much of it; None when nothing is stored."""
        return await self._call(lambda e: e.session_info(key))

    async def pin_session(self, key: str, seconds: float) -> bool:
        """Keep a session's KV for `seconds` whatever the eviction policy; False when it is not stored."""
        return await self._call(lambda e: e.pin_session(key, seconds))

    async def delete_session(self, key: str) -> bool:
        """Forget a session's KV in every tier; False when nothing was stored."""
        return await self._call(lambda e: e.delete_session(key))

    # ------------------------------------------------------------------ stored responses
    # Records of /v1/responses (store: true): local, in the SSD budget, and shared with --remote-kv. On a
    # thread of their own: they read files and the shared store, never on the event loop or engine thread.

    async def store_response(self, tenant: str, response_id: str, record: dict[str, Any]) -> None:
        """Keep a response's record; ResponseQuotaExceeded when the tenant's quota or the SSD budget is full."""
        await asyncio.to_thread(self._engine.responses.put, tenant, response_id, record)

    async def stored_response(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._engine.responses.get, tenant, response_id)

    async def delete_stored_response(self, tenant: str, response_id: str) -> bool:
        return await asyncio.to_thread(self._engine.responses.delete, tenant, response_id)

    @property
    def shares_responses(self) -> bool:
        """Stored responses are shared with other servers (--remote-kv): any of them may retrieve or cancel."""
        return self._engine.responses.shared

    async def mark_response_running(self, tenant: str, response_id: str, running: bool) -> None:
        await asyncio.to_thread(self._engine.responses.mark_running, tenant, response_id, running)

    async def response_running_elsewhere(self, tenant: str, response_id: str) -> bool:
        return await asyncio.to_thread(self._engine.responses.is_running, tenant, response_id)

    async def request_response_cancel(self, tenant: str, response_id: str) -> None:
        """Ask the server running a response (maybe another one) to stop it."""
        await asyncio.to_thread(self._engine.responses.request_cancel, tenant, response_id)

    async def response_cancel_requested(self, tenant: str, response_id: str) -> bool:
        return await asyncio.to_thread(self._engine.responses.cancel_requested, tenant, response_id)

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
            try:
                loop.call_soon_threadsafe(stream.put_nowait, out)
            except RuntimeError:  # that request's event loop is closed: nobody listens any more
                pass

    # ------------------------------------------------------------------ the engine thread

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                if kind == "add":
                    try:
                        self._engine.add_request(item)
                    except RequestRejected as e:
                        self._deliver(RequestOutput(item.request_id, [], "", [], len(item.prompt_ids), 0,
                                                    finished=True, finish_reason="rejected", error=str(e)))
                elif kind == "abort":
                    self._engine.abort(item)
                elif kind == "call":
                    item()
            except Exception as e:  # one bad item ends its own request, never the loop
                log.exception("engine inbox item %s failed", kind)
                if kind == "add":
                    self._deliver(RequestOutput(item.request_id, [], "", [], len(item.prompt_ids), 0,
                                                finished=True, finish_reason="error", error=f"internal error: {e}"))

    def _step(self) -> list[RequestOutput]:
        try:
            outputs = self._engine.step()
        except Exception as e:
            self._failures += 1
            log.exception("engine step failed (%d in a row)", self._failures)
            outputs = self._engine.fail_batch(f"internal error: {e}")
            if self._failures >= MAX_STEP_FAILURES:
                for out in outputs:
                    self._deliver(out)
                raise RuntimeError(f"{self._failures} engine steps failed in a row, the last with: {e!r}") from e
            return outputs
        self._failures = 0
        return outputs

    def _publish(self, now: float) -> None:
        self.snapshot = self._engine.snapshot(len(self._streams))
        self._published = now

    def _loop(self) -> None:
        reason = "the server is shutting down"
        self._failures = 0
        self._published = 0.0
        try:
            while not self._stop.is_set():
                self._wake.clear()
                now = time.monotonic()
                self.heartbeat = now
                self._drain_inbox()
                if not self._engine.has_work():
                    self._publish(now)
                    self._wake.wait(timeout=IDLE_WAIT_S)
                    continue
                steps = self._engine.stats.steps
                outputs = self._step()
                for out in outputs:
                    self._deliver(out)
                if now - self._published >= SNAPSHOT_EVERY_S:
                    self._publish(now)
                if self._engine.stats.steps == steps and not outputs:
                    self._wake.wait(timeout=STALLED_WAIT_S)
        except BaseException as e:  # noqa: BLE001 -- whatever ends the thread must be said and answered
            reason = f"the engine failed: {e!r}"
            log.critical("engine thread ending: %s", reason, exc_info=True)
        finally:
            self._die(reason)

    def _die(self, reason: str) -> None:
        """The engine thread is ending: refuse new work, end every open request, then write back the tiers."""
        self.dead_reason = reason
        try:
            for out in self._engine.fail_all(reason):
                self._deliver(out)
        except Exception:
            log.exception("ending the engine's requests failed")
        with self._streams_lock:
            orphans = list(self._streams)
        for rid in orphans:  # whatever the engine lost track of
            self._deliver(RequestOutput(rid, [], "", [], 0, 0, finished=True, finish_reason="error", error=reason))
        try:
            self.snapshot = self._engine.snapshot(len(self._streams))
            self._engine.close()
        except Exception:
            log.exception("closing the engine failed")
