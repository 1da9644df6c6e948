"""Engine logprobs -> the two OpenAI shapes (chat and legacy completions)."""

from __future__ import annotations

from typing import Any

from strata.engine.request import TokenLogprob
from strata.engine.tokenizer import Tokenizer


def _entry(tok: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = tok.token_text(token_id)
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tok: Tokenizer, items: list[TokenLogprob]) -> dict[str, Any]:
    content = []
    for it in items:
        e = _entry(tok, it.token_id, it.logprob)
        e["top_logprobs"] = [_entry(tok, t, lp) for t, lp in it.top]
        content.append(e)
    return {"content": content, "refusal": None}


def completion_logprobs(tok: Tokenizer, items: list[TokenLogprob], text_start: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_start
    for it in items:
        text = tok.token_text(it.token_id)
        tokens.append(text)
        token_logprobs.append(max(it.logprob, -9999.0))
        top.append({tok.token_text(t): max(lp, -9999.0) for t, lp in it.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
