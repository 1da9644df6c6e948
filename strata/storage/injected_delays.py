"""Storage latency injected on purpose (STRATA_INJECT_FAULT ``ssd-read-ms`` and ``remote-read-ms``, parsed
by :mod:`strata.engine.faults`), so tests can prove that a slow tier stalls only the session that reads
from it. The default costs one float test per chunk read."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class InjectedDelays:
    ssd_read_s: float = 0.0  # before each chunk file is read
    remote_read_s: float = 0.0  # before each value is fetched from the shared tier

    def before_ssd_read(self) -> None:
        if self.ssd_read_s:
            time.sleep(self.ssd_read_s)

    def before_remote_read(self) -> None:
        if self.remote_read_s:
            time.sleep(self.remote_read_s)


NO_DELAYS = InjectedDelays()
