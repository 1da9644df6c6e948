"""A layer-by-layer load in flight: the loader marks layers ready, the runner waits for them.

On a GPU a layer is "ready" once its copies are queued on the load stream; the event recorded after
them is kept here, and the runner's stream waits on it (see strata.storage.cuda_streams).

Delayed free: the destination blocks belong to the engine, but the loader writes into them until it lets
go. ``released`` turns True once the loader will never touch them again (its copies done, or the load
cancelled before it began); only then may the owner of a cancelled load free or reuse its blocks.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class KVLoadError(RuntimeError):
    """The load could not complete (corrupt chunk, session gone, cancelled): recompute instead."""


class KVLoadTimeout(KVLoadError):
    """A layer did not arrive within the caller's timeout (counted as ``load_timeouts``)."""


class LoadHandle:
    def __init__(self, session_key: str, num_tokens: int, num_layers: int, readahead_layers: int) -> None:
        self.session_key = session_key
        self.num_tokens = num_tokens
        self.num_layers = num_layers
        self._readahead = max(1, readahead_layers)
        self._cond = threading.Condition()
        self._ready = 0  # layers [0, ready) are in the device blocks
        self._consumed = -1  # highest layer the runner asked for
        self._error: Exception | None = None
        self._cancelled = False
        self._started = False  # the loader began; from then on only it may set _released
        self._released = False
        self._events: list[Any] = [None] * num_layers  # per layer: a torch.cuda.Event on a GPU, else None
        self.stalled_s = 0.0
        self.tier = "dram"  # the slowest tier the load reads from: "dram" or "ssd"

    @property
    def ready_layers(self) -> int:
        with self._cond:
            return self._ready

    @property
    def done(self) -> bool:
        with self._cond:
            return self._ready == self.num_layers or self._error is not None or self._cancelled

    @property
    def released(self) -> bool:
        """True once the loader will never write the destination blocks again: they may be freed."""
        with self._cond:
            return self._released

    def wait_released(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._released, timeout)

    def cancel(self) -> None:
        """Stop the load (the request went away); the loader moves on to the next one.

        ``released`` is set here if the loader has not begun this load, else by the loader when it stops.
        """
        with self._cond:
            self._cancelled = True
            if not self._started:
                self._released = True
            self._cond.notify_all()

    # loader side

    def begin(self) -> bool:
        """The loader picks the load up: False if it was cancelled first (then it is released already)."""
        with self._cond:
            if self._cancelled:
                self._released = True
                return False
            self._started = True
            return True

    def release(self) -> None:
        """The loader is done with the destination blocks (its copies have landed, on a GPU too)."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def wait_room(self, layer: int) -> bool:
        """Bounded read-ahead: the loader may run at most ``readahead_layers`` ahead of the runner."""
        with self._cond:
            while not self._cancelled and layer - self._consumed > self._readahead:
                self._cond.wait()
            return not self._cancelled

    def mark_ready(self, layer: int, event: Any = None) -> None:
        with self._cond:
            self._events[layer] = event
            self._ready = layer + 1
            self._cond.notify_all()

    def event(self, layer: int) -> Any:
        """What the runner's stream must wait for before reading ``layer`` (None: nothing, it is in)."""
        with self._cond:
            return self._events[layer]

    def fail(self, error: Exception) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    # runner side

    def wait(self, layer: int, timeout: float | None) -> float:
        """Block until ``layer`` is in; returns the seconds spent blocked."""
        t0 = time.perf_counter()
        deadline = None if timeout is None else t0 + timeout
        with self._cond:
            self._consumed = max(self._consumed, layer)
            self._cond.notify_all()
            while self._ready <= layer:
                if self._error is not None:
                    raise KVLoadError(str(self._error)) from self._error
                if self._cancelled:
                    raise KVLoadError("load cancelled")
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    raise KVLoadTimeout(f"layer {layer} did not arrive in {timeout} s")
                self._cond.wait(left)
        stalled = time.perf_counter() - t0
        self.stalled_s += stalled
        return stalled
