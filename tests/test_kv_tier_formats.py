"""--kv-tier-dtype: a session saved and reloaded through each tier format (DRAM, then SSD after a restart)
gives log-probs within the format's tolerance of recomputation, and for the default (int8) the same greedy
tokens; the codecs round-trip within their bounds and the tiers count compressed bytes."""

from __future__ import annotations

import pytest
import torch

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.request import Request
from strata.engine.sampling_params import SamplingParams
from strata.storage.kv_codec import DEFAULT_FORMAT, FORMATS, KVCodec

# Max |log-prob difference| of recomputation's most likely token at every position generated alike (SmolLM2,
# float32), and
# the codec's relative round-trip error on Gaussian rows.
LOGPROB_TOLERANCE = {"model": 1e-4, "int8": 0.06, "fp8": 0.3, "int4": 0.8}
ROUND_TRIP = {"model": 0.0, "int8": 0.01, "fp8": 0.04, "int4": 0.15}
ROW_BYTES = {"model": 64 * 4, "int8": 64 + 4, "fp8": 64 + 4, "int4": 32 + 4}  # head_dim 64, float32
QUESTION = ("Summarize the passage above in two sentences, then list three facts from it. " * 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_codec_round_trips_within_its_bound(fmt):
    codec = KVCodec(fmt, torch.float32, 64)
    x = torch.randn(2, 2, 37, 3, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0, 5] = 0  # an all-zero row
    stored = codec.encode(x)
    assert stored.shape[-1] * stored.element_size() == codec.row_bytes == ROW_BYTES[fmt]
    back = codec.decode(stored)
    assert back.dtype == torch.float32 and bool((back[0, 0, 5] == 0).all())
    assert ((back - x).norm() / x.norm()).item() <= ROUND_TRIP[fmt]
    assert torch.equal(codec.decode(stored[:, :, 10:20]), back[:, :, 10:20])  # rows slice as tokens


@pytest.mark.parametrize("head_dim", [96, 256])
def test_the_rotation_fits_any_head_dim(head_dim):
    """Rotated formats turn blocks of the largest power of two dividing head_dim (Phi-3's 96: three of 32)."""
    x = torch.randn(7, 2, head_dim, generator=torch.Generator().manual_seed(1))
    x[..., 3] *= 40  # an outlier channel, as keys have: the rotation spreads it over its block
    for fmt in ("int8", "int4"):
        codec = KVCodec(fmt, torch.float32, head_dim)
        assert ((codec.decode(codec.encode(x)) - x).norm() / x.norm()).item() <= ROUND_TRIP[fmt]


def answer(engine: LLMEngine, rid: str, ids: list[int], key: str | None) -> tuple[list[int], list, str | None]:
    engine.add_request(Request(rid, ids, SamplingParams(max_tokens=16, temperature=0.0, logprobs=True,
                                                        top_logprobs=5, ignore_eos=True), session_key=key))
    toks, lps, tier = [], [], None
    while engine.has_work():
        for o in engine.step():
            toks += o.new_token_ids
            lps += o.logprobs
            tier = o.cache_tier or tier
    return toks, lps, tier


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, session_cache=False))


def worst_difference(got: list, want: list) -> float:
    """Over the positions both generated alike: the largest difference of the log-prob of recomputation's
    most likely token (inf where it is not among ours top 5)."""
    worst = 0.0
    for g, w in zip(got, want, strict=False):
        token, lp = w.top[0]
        worst = max(worst, abs(dict(g.top).get(token, float("-inf")) - lp))
        if g.token_id != w.token_id:
            break
    return worst


def next_turn_matches_recomputation(engine: LLMEngine, reference: LLMEngine, rid: str, ids: list[int], tier: str,
                                    fmt: str) -> list[int]:
    """The session's next turn comes from `tier` and matches recomputation within the format's tolerance
    (the lossless and the default format: the same greedy tokens); returns its tokens."""
    got, got_lp, got_tier = answer(engine, rid, ids, "s")
    want, want_lp, _ = answer(reference, f"ref-{rid}", ids, None)
    assert got_tier == tier
    assert worst_difference(got_lp, want_lp) <= LOGPROB_TOLERANCE[fmt]
    if fmt in ("model", DEFAULT_FORMAT):
        assert got == want
    return got


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_session_reloaded_through_each_format_matches_recomputation(fmt, tmp_path, reference):
    cfg = EngineConfig(dtype="float32", kv_cache_gb=0.1, ssd_dir=str(tmp_path), kv_tier_dtype=fmt)
    engine = LLMEngine(cfg)
    tok = engine.tokenizer
    from strata.engine.skip.corpus import module_doc

    passage = module_doc("json")[:1500]
    ids = tok.encode_chat([{"role": "user", "content": passage}])
    first, _, _ = answer(engine, "t1", ids, "s")
    assert engine.store is not None
    assert engine.store.stats()[f"tier_bytes_per_token_{fmt}"] == ROW_BYTES[fmt] * 2 * 3 * 30
    ids2 = ids + first + tok.encode(QUESTION, add_special_tokens=False)
    engine.kv.cache.drop("s")  # not in device memory: reloaded from the DRAM tier
    engine.store.flush()
    got = next_turn_matches_recomputation(engine, reference, "t2", ids2, "dram", fmt)
    engine.close()

    restarted = LLMEngine(cfg)  # the chunk files, in this format, read back
    ids3 = ids2 + got + tok.encode(" And one more fact, please.", add_special_tokens=False)
    next_turn_matches_recomputation(restarted, reference, "t3", ids3, "ssd", fmt)
    restarted.close()
