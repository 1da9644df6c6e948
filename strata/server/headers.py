"""The headers of every generating response (chat, completions, responses): how much of the prompt was reused,
from which tier and how much of it from KV shared with other sessions, how many prompt tokens were dropped to
fit the context, and which sublayers were skipped.
Per-tier detail of a hit goes in headers, not in the OpenAI body."""

from __future__ import annotations

from strata.engine.request import RequestOutput, SkipReport


def response_headers(out: RequestOutput | None, dropped_tokens: int) -> dict[str, str]:
    """The headers for `out`, the output they describe (None: nothing came, nothing was reused or skipped)."""
    if out is None:
        return _cache_headers(0, None, 0, dropped_tokens) | _skip_headers(None)
    return (_cache_headers(out.num_cached_tokens, out.cache_tier, out.num_shared_tokens, dropped_tokens)
            | _skip_headers(out.skip))


def _cache_headers(cached_tokens: int, tier: str | None, shared_tokens: int, dropped_tokens: int) -> dict[str, str]:
    return {"X-Cached-Tokens": str(cached_tokens), "X-Cache-Tier": tier or "none",
            "X-Cached-Shared-Tokens": str(shared_tokens), "X-Truncated-Tokens": str(dropped_tokens)}


def _skip_headers(report: SkipReport | None) -> dict[str, str]:
    if report is None:
        return {"X-Skip-Policy": "none", "X-Skip-Mode": "none", "X-Skipped-Sublayers": "none"}
    return {"X-Skip-Policy": report.policy, "X-Skip-Mode": report.mode,
            "X-Skipped-Sublayers": ",".join(report.sublayers) or "none"}
