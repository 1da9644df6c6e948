"""The scheduler under block pressure: no livelock, waiting sequences hold nothing, a preempted sequence
reuses everything it computed, and anonymous prefix reuse stays within a tenant."""

from __future__ import annotations

import pytest

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.request import Request
from strata.engine.sampling_params import SamplingParams


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run(engine: LLMEngine, max_steps: int = 5000) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    steps = 0
    while engine.has_work():
        steps += 1
        assert steps < max_steps, "the engine made no progress"
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            assert o.error is None, o.error
        for seq in engine.scheduler.waiting:  # a sequence that is not running holds no blocks
            assert seq.blocks.num_blocks == 0 and seq.load is None
    return out


@pytest.fixture(scope="module")
def solo():
    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.25, session_cache=False))


def test_tight_pool_no_livelock_and_outputs_equal_solo(solo):
    """Six sessions whose turns together need more blocks than the pool has: everything finishes (with
    preemptions) and every answer equals its solo run."""
    # 40 blocks of 16 tokens per layer: 640 tokens in all, the six need 840.
    per_block = 2 * 16 * 3 * 64 * 4
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=30 * 40 * per_block / 2**30,
                                    max_num_batched_tokens=256))
    tok = engine.tokenizer
    prompts = {f"r{i}": tok.encode(f"Story number {i}: once upon a time there was a")[:40] for i in range(6)}
    for rid, ids in prompts.items():
        engine.add_request(Request(rid, ids, greedy(100), session_key=f"t/{rid}"))
    got = run(engine)
    assert engine.stats.preemptions > 0
    for rid, ids in prompts.items():
        solo.add_request(Request(rid, ids, greedy(100)))
        assert got[rid] == run(solo)[rid], rid
    assert engine.blocks_in_use == 0


def test_preempted_sequence_reuses_everything_it_computed():
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1))
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    engine.add_request(Request("a", ids, greedy(40), session_key="t/a"))
    for _ in range(21):  # the prompt, then 20 decode steps
        engine.step()
    seq = engine.scheduler.running[0]
    computed = seq.num_computed
    assert computed == len(ids) + 20
    engine.scheduler._preempt(seq)
    batch = engine.scheduler.schedule()
    (again, n), = batch.items
    assert again is seq and seq.num_computed == computed
    assert n == 1  # only the last sampled token is computed: nothing is recomputed
    assert seq.num_cached_tokens == 0  # what the client is told stays the first admission's


def test_anonymous_prefix_reuse_stays_within_a_tenant():
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1))
    ids = engine.tokenizer.encode("A shared system prompt that is long enough to fill several blocks. " * 4)
    cached = {}
    for rid, tenant in (("a", "t1"), ("b", "t2"), ("c", "t1")):
        engine.add_request(Request(rid, ids + [42], greedy(2), tenant=tenant))
        while engine.has_work():
            for o in engine.step():
                cached[rid] = o.num_cached_tokens
    assert cached["a"] == 0
    assert cached["b"] == 0, "another tenant's prefix was reused"
    assert cached["c"] > 0
