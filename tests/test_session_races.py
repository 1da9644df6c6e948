"""Sessions under races: two turns of one session at once (one with an edited history), and tier loads
racing client aborts. Whatever survives equals a server that recomputes everything."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import POOL_BYTES_PER_TOKEN, ServerProcess, started

MODEL = "SmolLM2-135M-Instruct"

TOPICS = ["the moon", "volcanoes", "honey bees", "the printing press", "glaciers", "octopuses", "jazz",
          "the Roman roads", "lighthouses", "tea", "comets", "bridges"]


def chat(base: str, messages: list[dict], session: str | None, max_tokens: int = 24) -> dict:
    headers = {"X-Session-ID": session} if session else {}
    r = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=300,
                   json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json() | {"tier": r.headers["X-Cache-Tier"]}


def text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("races")
    procs = {
        # A small device pool and DRAM tier: histories come back from DRAM and SSD, not only HBM (the device
        # pool holds about 930 tokens: fewer than the twelve histories of test_tier_loads_racing_aborts).
        # Lossless tiers: recomputation is the exact oracle of every reply.
        "on": ServerProcess("--kv-cache-gb", "0.04", "--dram-kv-gb", "0.02", "--ssd-dir", str(tmp / "ssd"),
                            "--max-model-len", "2048", "--kv-tier-dtype", "model", log=tmp / "on.log"),
        "off": ServerProcess("--no-session-cache", "--kv-cache-gb", "0.2", "--max-model-len", "2048",
                             log=tmp / "off.log"),
    }
    with started(procs):
        yield procs


def test_two_turns_of_one_session_at_once(servers):
    """One session, two concurrent turns: a continuation and an edited history. Each equals recomputation."""
    on, off = servers["on"].base_url, servers["off"].base_url
    first = [{"role": "user", "content": "Tell me about the moon."}]
    history = first + [{"role": "assistant", "content": text(chat(on, first, "race"))}]
    turns = [
        history + [{"role": "user", "content": "How far away is it?"}],
        [{"role": "user", "content": "Tell me about the sun instead."}],  # the client edited the history
    ]
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda m: chat(on, m, "race"), turns))
        for messages, reply in zip(turns, got, strict=True):
            assert text(reply) == text(chat(off, messages, None))


@pytest.mark.slow
def test_tier_loads_racing_aborts(servers):
    """Twelve sessions with stored history; their next turns are sent with more traffic and half are cut
    right after they were sent. Every turn that finishes equals recomputation, at least one of them was a
    tier load, and no blocks stay held."""
    on, off = servers["on"], servers["off"]
    histories = {}
    for i, topic in enumerate(TOPICS):
        msgs = [{"role": "user", "content": f"Write a paragraph about {topic}."}]
        histories[f"s{i}"] = msgs + [{"role": "assistant", "content": text(chat(on.base_url, msgs, f"s{i}", 64))}]
    rng = random.Random(7)
    # s0, the least recently used history, is out of the device pool by now and is never cut: its turn is
    # a tier load whose output is compared.
    cut = set(rng.sample(sorted(histories.keys() - {"s0"}), 6))
    tier_hits = [f'strata_kv_hits_total{{tier="{t}"}}' for t in ("dram", "ssd")]
    hits_before = sum(on.metric(m) for m in tier_hits)  # the counters are the server's, shared with test 1
    results: dict[str, str] = {}
    tiers: dict[str, str] = {}

    def turn(key: str) -> None:
        msgs = histories[key] + [{"role": "user", "content": "Now say it in one sentence."}]
        body = {"model": MODEL, "messages": msgs, "max_tokens": 24, "temperature": 0, "stream": True}
        if key not in cut:
            reply = chat(on.base_url, msgs, key)
            results[key], tiers[key] = text(reply), reply["tier"]
            return
        try:  # a client that goes away right after sending
            with httpx.stream("POST", on.base_url + "/v1/chat/completions", json=body,
                              headers={"X-Session-ID": key}, timeout=rng.uniform(0.05, 0.4)) as r:
                for _ in r.iter_lines():
                    break
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=turn, args=(k,)) for k in sorted(histories)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 6
    for key, got in results.items():
        msgs = histories[key] + [{"role": "user", "content": "Now say it in one sentence."}]
        assert got == text(chat(off.base_url, msgs, None)), key
    deadline = time.monotonic() + 5
    while on.metric("strata_kv_blocks_used") or on.metric("strata_requests_running"):
        assert time.monotonic() < deadline, "blocks stayed held after every request ended"
        time.sleep(0.2)
    assert tiers["s0"] in ("dram", "ssd"), tiers
    assert sum(on.metric(m) for m in tier_hits) > hits_before


def loads_racing_aborts(tmp_path, device: str | None = None, slow_copy: object = None) -> None:
    """Eight sessions' next turns are admitted (their history loads start from DRAM/SSD) and every other one
    is aborted before the step that would consume its load. The survivors equal recomputation, and the
    aborted loads' blocks are freed only once their loader let go of them. Shared with tests/gpu."""
    from strata.engine.config import EngineConfig
    from strata.engine.llm_engine import LLMEngine
    from strata.engine.request import Request
    from strata.engine.sampling_params import SamplingParams
    from tests.test_sessions import answer

    cfg = EngineConfig(dtype="float32", kv_cache_gb=0.1, ssd_dir=str(tmp_path), kv_tier_dtype="model",
                       dram_kv_gb=600 * POOL_BYTES_PER_TOKEN / 2**30, kv_chunk_tokens=32, device=device)
    engine = LLMEngine(cfg)
    reference = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, session_cache=False, device=device))
    prompts = {}
    for i, topic in enumerate(TOPICS[:8]):
        msgs = [{"role": "user", "content": f"Write a paragraph about {topic}."}]
        _, reply, _, _ = answer(engine, f"first{i}", engine.tokenizer.encode_chat(msgs), f"t/s{i}", n=32)
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And in one sentence?"}]
        prompts[f"t/s{i}"] = engine.tokenizer.encode_chat(msgs)
    assert engine.store is not None
    engine.store.flush()
    for key in engine.kv.cache.keys():
        engine.kv.cache.drop(key)  # the histories must come from DRAM or SSD

    for key, ids in prompts.items():
        engine.add_request(Request(key, ids, SamplingParams(max_tokens=16, temperature=0.0), session_key=key))
    if slow_copy is not None:  # loads still writing when the step after the aborts allocates their blocks again
        slow_copy()
    deadline = time.monotonic() + 30
    while engine._preparing:  # the store's side first readies each session (off the engine thread)
        assert time.monotonic() < deadline, "the sessions were never prepared"
        engine._schedule_prepared(0.1)
    engine.scheduler.schedule()  # admission: the loads start
    loading = [s for s in engine.scheduler.running if s.load is not None]
    assert len(loading) >= 4, "the histories did not come from the tiers"
    aborted = {s.request_id for s in loading[::2]}
    for rid in aborted:
        engine.abort(rid)
    assert engine.kv.num_deferred_blocks > 0  # held until their loader lets go, not freed at once
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            assert o.error is None
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    for key, ids in prompts.items():
        if key in aborted:
            continue
        want, _, _, _ = answer(reference, key, ids, None)
        assert got[key] == want, key
    deadline = time.monotonic() + 10
    while engine.kv.num_deferred_blocks:
        assert time.monotonic() < deadline, "a cancelled load never let go of its blocks"
        time.sleep(0.05)
        engine.kv.free_released()
    assert engine.blocks_in_use == 0
    engine.close()


def test_tier_loads_racing_aborts_in_the_engine(tmp_path, monkeypatch):
    import strata.storage.kv_loader as kv_loader

    copy = kv_loader.copy_kv_slots

    def slow(*args: object) -> None:
        time.sleep(0.01)
        copy(*args)

    loads_racing_aborts(tmp_path, slow_copy=lambda: monkeypatch.setattr(kv_loader, "copy_kv_slots", slow))
