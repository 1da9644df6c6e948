"""One request's skipping across its steps: the mode, the decode counter, AdaSkip's online step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from strata.engine.models.attention_batch import SublayerStats
from strata.engine.skip.policy import SkipPolicy
from strata.engine.skip.skip_set import EMPTY, SkipSet

Mode = Literal["prefill", "decode", "e2e"]
MODES: tuple[Mode, ...] = ("prefill", "decode", "e2e")


class RequestSkipState:
    """Held by the engine, one per request (never shared, never reused for another request).

    Per forward pass that contains this request, the engine:

    1. calls `plan_for_step(is_prefill)` -> SkipSet of this step (every prefill chunk is a
       prefill step; each single-token step a decode step) and passes it with the request's
       rows to `strata.engine.skip.plan.build_skip_plan`;
    2. if `measuring` is True right after that call, adds the request's decode row to the
       plan's `measure_rows`, and after the forward calls
       `observe(plan.stats, row=<index of that row within measure_rows>)`.

    Modes: `prefill` skips the fixed set in prefill steps only; `decode` only in decode
    steps; `e2e` in both. In decode steps an AdaSkip policy also measures, during the first
    `window` (W) decode steps, the online similarity and scale of every FFN it runs; the FFNs
    whose mean online similarity is >= beta (the lowest offline similarity in the fixed set)
    join this request's `extra` set, with their mean online scale, for the rest of its decode.

    KV safety: once a step skipped attention at layer l, later steps of this request skip it
    too (earlier tokens have no K/V there). `attn_skipped` is that set. The engine never lets
    other requests reuse KV computed with skipping (see strata/engine/kv_cache/manager.py).

    Recomputation (preemption): the engine calls `restart()` when the request's KV is dropped,
    then plans its steps again in order, passing each decode step's index (`decode_step`):
    a step planned before is replayed with the set it had and is neither counted nor
    measured again.
    """

    def __init__(self, policy: SkipPolicy, mode: Mode = "e2e", window: int = 20) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown skip mode {mode!r}; choose one of {', '.join(MODES)}")
        self.policy = policy
        self.mode = mode
        self.window = window
        self.decode_steps = 0  # decode steps planned so far
        self.extra: SkipSet = EMPTY
        self.attn_skipped: dict[int, float] = {}
        self.measuring = False
        self._sim: dict[int, list[float]] = {}
        self._scale: dict[int, list[float]] = {}
        self._observed = 0
        self._extra_from: int | None = None  # first decode step that skips the extra set

    @property
    def online(self) -> bool:
        return self.policy.online and self.policy.beta is not None and self.mode in ("decode", "e2e")

    def attn_skips(self, is_prefill: bool, decode_step: int | None = None) -> set[int]:
        """The attention layers the step `plan_for_step` would plan next skips, without planning it:
        the scheduler gives the request no KV blocks at those layers."""
        step = None if is_prefill else (self.decode_steps if decode_step is None else decode_step)
        skips_now = self.mode == "e2e" or (self.mode == "prefill") == is_prefill
        chosen = self.policy.skip_set(step).attn if skips_now else {}
        return set(self.attn_skipped) | set(chosen)

    def plan_for_step(self, is_prefill: bool, decode_step: int | None = None) -> SkipSet:
        """The sublayers this request skips in the step being built (call once per step, in order).

        `decode_step`: the index of a decode step (0 feeds the first generated token); default
        the next one. A step below the count planned so far is a replay (recomputation)."""
        step = None if is_prefill else (self.decode_steps if decode_step is None else decode_step)
        new = step is not None and step >= self.decode_steps
        skips_now = self.mode == "e2e" or (self.mode == "prefill") == is_prefill
        chosen = self.policy.skip_set(step) if skips_now else EMPTY
        if step is not None:
            self.decode_steps = max(self.decode_steps, step + 1)
            if skips_now and self._extra_from is not None and step >= self._extra_from:
                chosen = chosen.union(self.extra)
        # Each of the first W new decode steps is measured once (a replayed step is not).
        self.measuring = new and self.online and self._observed < self.window
        # Sticky attention skips: tokens after a skip must not attend to K/V never written.
        attn = {**self.attn_skipped, **chosen.attn}
        self.attn_skipped = attn
        return SkipSet(attn, dict(chosen.ffn))

    def restart(self) -> None:
        """The request's KV was dropped but for history computed without skipping: nothing is
        missing any more, and replaying its steps in order rebuilds the sticky attention set."""
        self.attn_skipped = {}
        self.measuring = False

    def observe(self, layer_stats: Sequence[SublayerStats], row: int = 0) -> None:
        """Feed the per-layer statistics of one measured decode step (row = this request's index
        among the plan's measure_rows). After W observed steps the extra set is decided."""
        if not self.online or self._observed >= self.window:
            return
        for layer, st in enumerate(layer_stats):
            sim, scale = float(st.sim_ffn[row]), float(st.scale_ffn[row])
            if layer == 0 or sim != sim:  # layer 0 never skipped; NaN = FFN was skipped
                continue
            self._sim.setdefault(layer, []).append(sim)
            self._scale.setdefault(layer, []).append(scale)
        self._observed += 1
        if self._observed == self.window:
            self._decide()

    def _decide(self) -> None:
        beta = self.policy.beta
        assert beta is not None
        extra = {}
        for layer, sims in self._sim.items():
            if layer in self.policy.fixed.ffn:
                continue
            if float(torch.tensor(sims).mean()) >= beta:
                extra[layer] = float(torch.tensor(self._scale[layer]).mean())
        self.extra = SkipSet({}, extra)
        self._extra_from = self.decode_steps
