"""Faults injected on purpose, so tests can prove what one failure costs (env STRATA_INJECT_FAULT).

Comma-separated, each `kind=value`:

* `step=N`: the N-th engine step begun (counting from 1) raises as a failed forward pass would;
* `engine-death=N`: the engine thread ends at step N as if it had crashed;
* `sample-seed=S`: sampling raises for every request whose seed is S;
* `ssd-read-ms=MS`, `remote-read-ms=MS`: each chunk read from the SSD tier, or fetched from the shared
  tier, first waits MS milliseconds (a slow disk or network; see strata.storage.injected_delays).

Unset (the default) costs one attribute test per step.
"""

from __future__ import annotations

import os

from strata.storage.injected_delays import InjectedDelays

KINDS = ("step", "engine-death", "sample-seed", "ssd-read-ms", "remote-read-ms")


class InjectedFault(RuntimeError):
    pass


class EngineDeath(BaseException):
    """Not an Exception: nothing in the engine's step handling catches it, so the thread ends."""


class Faults:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("STRATA_INJECT_FAULT", "") if spec is None else spec
        self._faults: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, value = item.partition("=")
            if kind not in KINDS or not value.lstrip("-").isdigit():
                raise ValueError(f"STRATA_INJECT_FAULT: cannot read {item!r}")
            self._faults[kind] = int(value)
        self.active = bool(self._faults.keys() & {"step", "engine-death", "sample-seed"})  # checked per step
        self._steps = 0  # steps begun, failed ones included

    def storage_delays(self) -> InjectedDelays:
        return InjectedDelays(ssd_read_s=self._faults.get("ssd-read-ms", 0) / 1000,
                              remote_read_s=self._faults.get("remote-read-ms", 0) / 1000)

    def before_step(self) -> None:
        self._steps += 1
        step = self._steps
        if step == self._faults.get("engine-death"):
            raise EngineDeath(f"injected engine death at step {step}")
        if step == self._faults.get("step"):
            raise InjectedFault(f"injected failure of step {step}")

    def before_sample(self, seed: int | None) -> None:
        if seed is not None and seed == self._faults.get("sample-seed"):
            raise InjectedFault(f"injected sampling failure for seed {seed}")
