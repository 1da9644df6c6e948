"""What the engine is asked (Request) and what it answers (RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SkipRequest:
    """AdaSkip for one request: skip `sublayers` sublayers (0 = none) in mode prefill, decode or e2e."""

    sublayers: int
    mode: str = "e2e"


@dataclass(frozen=True)
class SkipReport:
    """What a request skips, for the response headers: the engine's policy, the mode, and the sublayers
    (the fixed set, plus the request's own online extra FFNs once decided), e.g. ("attn25", "ffn9")."""

    policy: str
    mode: str
    sublayers: tuple[str, ...]


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    session_key: str | None = None
    skip: SkipRequest | None = None  # None: the engine's default (EngineConfig.skip_sublayers / skip_mode)
    # Context overflow: the prompt is the client's full history with tokens [keep_head, drop_end) cut
    # out; the session's stored KV is cut the same way (kept keys re-rotated) before reuse.
    truncation: tuple[int, int] | None = None
    # Who sent it (a hash of the API key): anonymous prefix reuse never crosses tenants.
    tenant: str = "public"
    # False: nothing of this request's KV is kept after it (no session save, no cached device blocks); it
    # may still reuse what is stored (e.g. a Responses call with store: false continuing a stored chain).
    keep_kv: bool = True


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
    num_shared_tokens: int = 0  # of the reused tokens, those from chunks other sessions share (stored once)
    skip: SkipReport | None = None  # None when the request skips nothing
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
