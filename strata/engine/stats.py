"""Counters the engine keeps for /metrics (the server turns them into Prometheus text)."""

from __future__ import annotations

import bisect
import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from strata.engine.skip.request_state import RequestSkipState

if TYPE_CHECKING:
    from strata.engine.llm_engine import LLMEngine

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


@dataclass(frozen=True)
class EngineSnapshot:
    """A copy of the engine's gauges and counters, taken on the engine thread and published whole, so
    /metrics never iterates what the engine thread mutates."""

    taken: float  # time.monotonic()
    last_step: float | None  # time.monotonic() of the last step that ran a batch
    running: int
    waiting: int
    in_flight: int
    blocks_total: int
    blocks_used: int  # held by queued or running sequences (and cancelled loads not yet let go)
    blocks_cached: int  # caching finished sessions (the HBM tier)
    block_bytes: int
    stats: EngineStats
    kv_hits: dict[str, int]
    kv_tokens_reused: dict[str, int]
    kv_load_failures: int
    hbm_evictions: int
    skip_tokens_not_saved: int
    store: dict[str, float]
    responses: dict[str, float]  # stored response records (responses_<key>)
    skip_profile_loaded: bool
    skip_policy: str

    @classmethod
    def take(cls, e: LLMEngine, in_flight: int) -> EngineSnapshot:
        kv = e.kv
        return cls(
            taken=time.monotonic(), last_step=e.last_step_time, running=e.num_running, waiting=e.num_waiting,
            in_flight=in_flight, blocks_total=e.pool.num_blocks, blocks_used=e.blocks_in_use,
            blocks_cached=kv.cache.num_blocks, block_bytes=e.pool.block_bytes, stats=copy.deepcopy(e.stats),
            kv_hits=dict(kv.hits), kv_tokens_reused=dict(kv.tokens_reused), kv_load_failures=kv.load_failures,
            hbm_evictions=kv.cache.evicted_entries, skip_tokens_not_saved=kv.skip_tokens_not_saved,
            store=e.store.stats() if e.store is not None else {},
            responses=e.responses.stats(),
            skip_profile_loaded=e.skips.profile is not None, skip_policy=e.skips.policy_name,
        )
