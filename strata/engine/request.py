"""What the engine is asked (Request) and what it answers (RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.engine.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    session_key: str | None = None
    skip_policy: object | None = None
    # Context overflow: the prompt is the client's full history with tokens [keep_head, drop_end) cut
    # out; the session's stored KV is cut the same way (kept keys re-rotated) before reuse.
    truncation: tuple[int, int] | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob]
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    cache_tier: str | None = None  # hbm, dram or ssd when tokens were reused
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
