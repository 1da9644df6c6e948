"""The engine's AdaSkip setup: its policy, the model's profile, and a RequestSkipState per request.

The profile (`adaskip-profile.json`, written by `strata calibrate`) is read once at start from
the model directory, else from the profiles shipped with strata (the default model's); one
calibrated for other weights is ignored with a warning. Without a
profile the baseline policies still work, and AdaSkip requests are refused before they run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

from strata.engine.config import EngineConfig
from strata.engine.request import SkipReport, SkipRequest
from strata.engine.skip.policy import POLICIES, SkipPolicy, make_policy
from strata.engine.skip.profile import ProfileMismatchError, SkipProfile, profile_path, shipped_profile_path
from strata.engine.skip.request_state import MODES, Mode, RequestSkipState

log = logging.getLogger(__name__)


class SkipRejected(ValueError):
    """A skip request that cannot be served; `param` names the offending field."""

    def __init__(self, message: str, param: str = "skip") -> None:
        super().__init__(message)
        self.param = param


def load_profile(model_dir: Path, fingerprint: str) -> SkipProfile | None:
    path = profile_path(model_dir)
    if not path.exists():
        path = shipped_profile_path(fingerprint)
    if not path.exists():
        return None
    try:
        profile = SkipProfile.load(path, fingerprint)
    except ProfileMismatchError as e:
        log.warning("ignoring the AdaSkip profile: %s", e)
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable AdaSkip profile %s: %s", path, e)
        return None
    log.info("AdaSkip profile loaded (%s, %d requests)", profile.corpus, profile.requests)
    return profile


class SkipSetup:
    def __init__(self, config: EngineConfig, model_dir: Path, fingerprint: str, num_layers: int,
                 supported: bool = True) -> None:
        if config.skip_policy not in POLICIES:
            raise ValueError(f"unknown skip policy {config.skip_policy!r}; choose one of {', '.join(POLICIES)}")
        self.config = config
        self.policy_name = config.skip_policy
        self.num_layers = num_layers
        self.supported = supported  # the model's layer has a skipping path (not Gemma 3's yet)
        self.profile = load_profile(model_dir, fingerprint) if config.skip_policy == "adaskip" else None
        self._policies: dict[int, SkipPolicy] = {}
        default = self.default()
        try:
            self.check(default)
        except SkipRejected as e:  # a server default that can never work is a start-up error
            raise ValueError(f"--skip-sublayers {default.sublayers} --skip-mode {default.mode}: {e}") from e

    @property
    def max_sublayers(self) -> int:
        """Every sublayer but layer 0's (never skipped)."""
        return 2 * (self.num_layers - 1)

    def default(self) -> SkipRequest:
        return SkipRequest(self.config.skip_sublayers, self.config.skip_mode)

    def check(self, spec: SkipRequest) -> None:
        """Raise SkipRejected unless `spec` can be served."""
        if spec.sublayers and not self.supported:
            raise SkipRejected("sublayer skipping is not implemented for this model family yet", "skip.sublayers")
        if spec.mode not in MODES:
            raise SkipRejected(f"skip mode {spec.mode!r} is not one of {', '.join(MODES)}", "skip.mode")
        if not 0 <= spec.sublayers <= self.max_sublayers:
            raise SkipRejected(f"skip sublayers must be between 0 and {self.max_sublayers} (every sublayer but "
                               f"layer 0's), got {spec.sublayers}", "skip.sublayers")
        if spec.sublayers and self.policy_name == "adaskip" and self.profile is None:
            raise SkipRejected(
                "AdaSkip needs a calibration profile for this model and none was found next to it. Run "
                f"`strata calibrate --model {self.config.model}` once, then restart the server "
                "(or serve with a baseline --skip-policy).")

    def state_for(self, spec: SkipRequest | None) -> RequestSkipState | None:
        """A fresh per-request state; None when the request skips nothing (the plain path)."""
        spec = spec or self.default()
        self.check(spec)
        if spec.sublayers == 0:
            return None
        policy = self._policies.get(spec.sublayers)
        if policy is None:
            policy = make_policy(self.policy_name, spec.sublayers, self.num_layers, self.profile)
            self._policies[spec.sublayers] = policy
        return RequestSkipState(policy, cast(Mode, spec.mode))  # checked above

    def report(self, state: RequestSkipState) -> SkipReport:
        fixed, extra = state.policy.fixed, state.extra
        names = [f"attn{i}" for i in sorted(fixed.attn)] + [f"ffn{i}" for i in sorted({**extra.ffn, **fixed.ffn})]
        return SkipReport(self.policy_name, state.mode, tuple(names))
