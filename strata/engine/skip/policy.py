"""Which sublayers a policy skips at a budget of m sublayers: AdaSkip and three baselines.

AdaSkip takes the top m of the calibrated joint ranking and rescales the residual stream by the
calibrated scale. The baselines choose by position and do not rescale (scale 1):
early exit = the last layers, SkipDecode = the first layers after layer 0, ramping up during
decode, unified = every (L/n)-th layer. A baseline's whole layer is two sublayers; an odd
budget takes the attention of one more layer. Layer 0 is never skipped by any policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.engine.skip.profile import SkipProfile
from strata.engine.skip.skip_set import EMPTY, Kind, SkipSet

POLICIES = ("adaskip", "early-exit", "skipdecode", "unified")


def _whole_layers(layers: list[int], budget: int) -> list[tuple[int, Kind]]:
    subs: list[tuple[int, Kind]] = [(i, k) for i in layers if i != 0 for k in ("attn", "ffn")]
    return subs[: max(0, budget)]


def adaskip_sublayers(profile: SkipProfile, budget: int) -> list[tuple[int, Kind]]:
    return profile.top(budget)


def early_exit_sublayers(num_layers: int, budget: int) -> list[tuple[int, Kind]]:
    return _whole_layers(list(range(num_layers - 1, 0, -1)), budget)


def skipdecode_sublayers(num_layers: int, budget: int) -> list[tuple[int, Kind]]:
    return _whole_layers(list(range(1, num_layers)), budget)


def unified_sublayers(num_layers: int, budget: int) -> list[tuple[int, Kind]]:
    n = -(-budget // 2)  # layers touched
    if n == 0:
        return []
    # Evenly spaced from the last layer down, stride (L-1)/n >= 1: distinct and never layer 0.
    layers = sorted(num_layers - 1 - (j * (num_layers - 1)) // n for j in range(n))
    return _whole_layers(layers, budget)


@dataclass(frozen=True)
class SkipPolicy:
    """A named policy at a budget. `skip_set(decode_step)` gives the fixed set of one step
    (decode_step None = a prefill step); `online` says whether AdaSkip's per-request online
    FFN step applies, with `beta` its threshold."""

    name: str
    budget: int
    fixed: SkipSet
    online: bool = False
    beta: float | None = None
    ramp: int = 0  # SkipDecode: decode steps over which the skipped count grows to the budget
    num_layers: int = 0

    def skip_set(self, decode_step: int | None) -> SkipSet:
        if self.ramp <= 0 or decode_step is None or decode_step + 1 >= self.ramp:
            return self.fixed
        # SkipDecode ramp: the first layers' sublayers, growing linearly to the budget.
        n = -(-self.budget * (decode_step + 1) // self.ramp)
        return SkipSet.of(skipdecode_sublayers(self.num_layers, n))


def make_policy(
    name: str, budget: int, num_layers: int, profile: SkipProfile | None = None, ramp: int = 20
) -> SkipPolicy:
    """The policy `name` (one of POLICIES, or "none") skipping `budget` sublayers."""
    if name == "none" or budget <= 0:
        return SkipPolicy("none", 0, EMPTY)
    if name == "adaskip":
        if profile is None:
            raise ValueError("AdaSkip needs a calibration profile: run `strata calibrate` first")
        subs = adaskip_sublayers(profile, budget)
        scales = {s: profile.scale(*s) for s in subs}
        return SkipPolicy(name, budget, SkipSet.of(subs, scales), online=True, beta=profile.beta(budget))
    if name == "early-exit":
        return SkipPolicy(name, budget, SkipSet.of(early_exit_sublayers(num_layers, budget)))
    if name == "skipdecode":
        return SkipPolicy(name, budget, SkipSet.of(skipdecode_sublayers(num_layers, budget)), ramp=ramp,
                          num_layers=num_layers)
    if name == "unified":
        return SkipPolicy(name, budget, SkipSet.of(unified_sublayers(num_layers, budget)))
    raise ValueError(f"unknown skip policy {name!r}; choose one of {', '.join(POLICIES)}")
