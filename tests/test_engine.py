"""The engine against transformers' greedy generation, and its scheduling invariants."""

from __future__ import annotations

import pytest
import torch

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.request import Request
from strata.engine.sampling_params import SamplingParams
from tests.conftest import POOL_BYTES_PER_TOKEN

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
QUESTIONS = ["Tell me a joke.", "What is 2+2?", "Name three colors.", "Why is the sky blue?",
             "What is the capital of France?", "Write a haiku about rain."]


def run(engine: LLMEngine, requests: list[Request]) -> dict[str, tuple[list[int], str, str | None]]:
    for r in requests:
        engine.add_request(r)
    out: dict[str, tuple[list[int], str, str | None]] = {r.request_id: ([], "", None) for r in requests}
    while engine.has_work():
        for o in engine.step():
            ids, text, _ = out[o.request_id]
            out[o.request_id] = (ids + o.new_token_ids, text + o.new_text, o.finish_reason)
    return out


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_greedy_matches_transformers(engine, hf_model):
    ids = engine.tokenizer.encode_chat(CHAT)
    got = run(engine, [Request("g", ids, greedy(40, ignore_eos=True))])["g"][0]
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert got == ref[0, len(ids):].tolist()
    assert len(got) >= 32


@pytest.mark.slow
def test_batch_chunking_and_preemption_do_not_change_greedy_output(engine):
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    alone = {f"r{i}": run(engine, [Request(f"r{i}", p, greedy(24))])[f"r{i}"][0] for i, p in enumerate(prompts)}
    together = run(engine, [Request(f"r{i}", p, greedy(24)) for i, p in enumerate(prompts)])
    assert {k: v[0] for k, v in together.items()} == alone

    # A tiny pool and budget force chunked prefill and preemption (recompute): two sequences of
    # about 36 + 40 tokens need 5 blocks of 16 each, and the pool holds 8.
    small = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=8 * 16 * POOL_BYTES_PER_TOKEN / 2**30,
                                   max_num_batched_tokens=24))
    assert small.pool.num_blocks == 8 * small.pool.num_layers
    pair = prompts[:2]
    ref = {f"q{i}": run(engine, [Request(f"q{i}", p, greedy(40, ignore_eos=True))])[f"q{i}"][0]
           for i, p in enumerate(pair)}
    squeezed = run(small, [Request(f"q{i}", p, greedy(40, ignore_eos=True)) for i, p in enumerate(pair)])
    assert small.stats.preemptions > 0
    assert {k: v[0] for k, v in squeezed.items()} == ref
    assert small.blocks_in_use == 0


def test_seed_reproducible_and_sampling_varies(engine):
    ids = engine.tokenizer.encode_chat(CHAT)
    p = dict(max_tokens=20, temperature=1.0, top_p=0.95)
    a = run(engine, [Request("a", ids, SamplingParams(seed=7, **p))])["a"][0]
    b = run(engine, [Request("b", ids, SamplingParams(seed=7, **p)),
                     Request("c", ids, SamplingParams(seed=8, **p))])
    assert a == b["b"][0]
    assert a != b["c"][0]


def test_stop_strings_cut_text_and_never_emit_them(engine):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    full = run(engine, [Request("f", ids, greedy(60))])["f"][1]
    assert "5" in full
    stop = full[full.index("5") - 1 : full.index("5") + 2]  # a stop string spanning several characters
    got = run(engine, [Request("s", ids, greedy(60, stop=[stop]))])["s"]
    assert got[2] == "stop"
    assert got[1] == full[: full.index(stop)]
    assert stop not in got[1]


def test_max_tokens_min_tokens_and_eos(engine):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    short = run(engine, [Request("a", ids, greedy(60))])["a"]
    assert short[2] == "stop" and short[0][-1] in engine.eos_token_ids and "Paris" in short[1]
    longer = run(engine, [Request("b", ids, greedy(60, min_tokens=len(short[0]) + 5))])["b"]
    assert len(longer[0]) >= len(short[0]) + 5
    capped = run(engine, [Request("c", ids, greedy(3))])["c"]
    assert capped[2] == "length" and len(capped[0]) == 3


def test_logit_bias_and_penalties(engine):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Say hello."}])
    base = run(engine, [Request("a", ids, greedy(5))])["a"][0]
    banned = run(engine, [Request("b", ids, greedy(5, logit_bias={base[0]: -100.0}))])["b"][0]
    assert banned[0] != base[0]
    forced = run(engine, [Request("c", ids, greedy(3, logit_bias={42: 100.0}))])["c"][0]
    assert forced == [42, 42, 42]
    no_repeat = run(engine, [Request("d", ids, greedy(3, logit_bias={42: 100.0}, frequency_penalty=2.0,
                                                           presence_penalty=2.0, repetition_penalty=1.0))])["d"][0]
    assert no_repeat == [42, 42, 42]  # +100 outweighs penalties of at most 4 per step
    rep = run(engine, [Request("e", ids, greedy(12, repetition_penalty=5.0, ignore_eos=True))])["e"][0]
    assert len(set(rep)) == len(rep)  # a strong repetition penalty forbids repeats


def test_logprobs_are_the_model_distribution(engine, hf_model):
    ids = engine.tokenizer.encode_chat(CHAT)
    got = []
    engine.add_request(Request("lp", ids, greedy(3, logprobs=True, top_logprobs=5)))
    while engine.has_work():
        for o in engine.step():
            got += o.logprobs
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1], -1)
    first = got[0]
    assert first.token_id == int(ref.argmax())
    assert abs(first.logprob - float(ref.max())) < 1e-3
    assert [t for t, _ in first.top] == ref.topk(5).indices.tolist()
    assert len(got) == 3


def test_abort_frees_blocks(engine):
    ids = engine.tokenizer.encode_chat(CHAT)
    engine.add_request(Request("x", ids, greedy(100, ignore_eos=True)))
    engine.step()
    assert engine.blocks_in_use > 0
    out = engine.abort("x")
    assert out is not None and out.finish_reason == "abort"
    assert engine.blocks_in_use == 0 and not engine.has_work()
