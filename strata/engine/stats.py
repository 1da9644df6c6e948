"""Counters the engine keeps for /metrics (the server turns them into Prometheus text)."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from strata.engine.skip.request_state import RequestSkipState

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


@dataclass
class EngineStats:
    finished: Counter[str] = field(default_factory=Counter)  # by finish reason
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    ttft_by_tier: dict[str, Histogram] = field(default_factory=dict)  # "none" for misses
    # AdaSkip, per finished request that skipped: requests by mode, sublayers by kind (attn, ffn),
    # and how many of the FFNs were the request's own online extras.
    skip_requests: Counter[str] = field(default_factory=Counter)
    skip_sublayers: Counter[str] = field(default_factory=Counter)
    skip_extra_ffns: int = 0

    def observe_ttft(self, seconds: float, tier: str | None) -> None:
        self.ttft.observe(seconds)
        self.ttft_by_tier.setdefault(tier or "none", Histogram(TTFT_BUCKETS)).observe(seconds)

    def observe_skip(self, state: RequestSkipState) -> None:
        self.skip_requests[state.mode] += 1
        self.skip_sublayers["attn"] += len(state.policy.fixed.attn)
        self.skip_sublayers["ffn"] += len(state.policy.fixed.ffn) + len(state.extra.ffn)
        self.skip_extra_ffns += len(state.extra.ffn)
