"""One background thread that runs queued jobs in order (the saver, the loader, the SSD I/O thread)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], None]


class JobThread:
    """A daemon thread and its FIFO of jobs; ``join(timeout)`` waits until every queued job has run.

    ``idle`` (if given) runs whenever no job arrived for ``idle_s`` seconds: periodic upkeep.
    A job that raises is logged and reported through ``on_error``; the thread goes on.
    """

    def __init__(self, name: str, on_error: Callable[[], None], idle: Job | None = None,
                 idle_s: float = 0.5) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending = 0  # queued or running jobs, for join()
        self._on_error = on_error
        self._idle = idle
        self._idle_s = idle_s
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, job: Job) -> None:
        with self._cond:
            self._pending += 1
        self._jobs.put(job)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return self._pending

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the queue is drained; False if ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float | None) -> None:
        """Run what is queued, then end the thread; waits at most ``timeout`` seconds for it."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_s if self._idle is not None else None)
            except queue.Empty:
                assert self._idle is not None
                self._call(self._idle)
                continue
            if job is None:
                return
            try:
                self._call(job)
            finally:
                with self._cond:
                    self._pending -= 1
                    if self._pending == 0:
                        self._cond.notify_all()

    def _call(self, job: Job) -> None:
        try:
            job()
        except Exception:
            log.exception("KV store background job failed")
            self._on_error()
