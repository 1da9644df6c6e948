"""Session KV reuse (CachedAttention): answers served from every tier equal recomputation."""

from __future__ import annotations

import json
import shutil
import signal
import time

import httpx
import openai
import pytest

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.request import Request
from strata.engine.sampling_params import SamplingParams
from tests.conftest import TIER_BYTES_PER_TOKEN, ServerProcess

TURNS = ["Tell me about the moon.", "How far away is it?", "Who walked on it first?", "What is it made of?",
         "Thank you! Summarize our chat."]


def answer(engine: LLMEngine, rid: str, ids: list[int], key: str | None, n: int = 16) -> tuple[list[int], str, int,
                                                                                                 str | None]:
    """Greedy answer: (token ids, text, cached tokens, tier)."""
    engine.add_request(Request(rid, ids, SamplingParams(max_tokens=n, temperature=0.0), session_key=key))
    toks, text, cached, tier = [], "", 0, None
    while engine.has_work():
        for o in engine.step():
            toks += o.new_token_ids
            text += o.new_text
            cached, tier = o.num_cached_tokens, o.cache_tier
    return toks, text, cached, tier


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, session_cache=False))


@pytest.mark.slow
def test_every_tier_serves_what_recomputation_serves(tmp_path, reference):
    """Two interleaved sessions; DRAM holds about one, so the other is read back from SSD; then a restart."""
    cfg = EngineConfig(dtype="float32", kv_cache_gb=0.1, ssd_dir=str(tmp_path),
                       dram_kv_gb=256 * TIER_BYTES_PER_TOKEN / 2**30, kv_chunk_tokens=32)
    engine = LLMEngine(cfg)
    histories = {"a": [], "b": []}
    tiers_seen: set[str] = set()

    def turn(eng: LLMEngine, key: str, i: int, force: str | None) -> str | None:
        msgs = histories[key] + [{"role": "user", "content": TURNS[i]}]
        ids = eng.tokenizer.encode_chat(msgs)
        if force == "store":
            eng.kv.cache.drop(key)  # not in HBM: must come from the store
            eng.store.flush()
        got = answer(eng, f"{key}{i}", ids, key)
        want = answer(reference, f"{key}{i}", ids, None)
        assert got[0] == want[0], f"turn {i} of {key} from {got[3]} differs from recomputation"
        histories[key] = msgs + [{"role": "assistant", "content": got[1]}]
        if got[3]:
            tiers_seen.add(got[3])
            assert got[2] > 0
        return got[3]

    for i in range(4):  # from turn 2 on, HBM is dropped: the history comes from DRAM or SSD
        turn(engine, "a", i, "store" if i >= 2 else None)
        turn(engine, "b", i, "store" if i >= 2 else None)
    assert turn(engine, "a", 4, None) == "hbm"
    assert tiers_seen >= {"hbm", "dram", "ssd"}, tiers_seen
    engine.close()

    restarted = LLMEngine(cfg)  # the SSD tier is scanned and served again
    assert turn(restarted, "b", 4, None) == "ssd"
    restarted.close()


def test_edited_history_reuses_only_the_common_prefix(tmp_path, reference):
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, ssd_dir=str(tmp_path)))
    msgs = [{"role": "user", "content": TURNS[0]}]
    first = answer(engine, "1", engine.tokenizer.encode_chat(msgs), "s")
    msgs += [{"role": "assistant", "content": first[1]}, {"role": "user", "content": TURNS[1]}]
    answer(engine, "2", engine.tokenizer.encode_chat(msgs), "s")
    # The client edits its first question: only the system prompt part is still valid.
    edited = [{"role": "user", "content": "Tell me about the sun."}] + msgs[1:]
    ids = engine.tokenizer.encode_chat(edited)
    stored = engine.tokenizer.encode_chat(msgs)
    common = next(i for i, (x, y) in enumerate(zip(ids, stored, strict=False)) if x != y)
    got = answer(engine, "3", ids, "s")
    assert 0 < got[2] <= common
    assert got[0] == answer(reference, "3", ids, None)[0]
    for tier in ("dram", "ssd"):  # the same from the store, after the cut-back
        engine.kv.cache.drop("s")
        engine.store.flush()
        again = answer(engine, f"4{tier}", ids, "s")
        assert again[0] == got[0] and again[3] in ("dram", "ssd") and again[2] > common
    engine.close()


def test_corrupt_and_foreign_chunks_are_never_served(tmp_path, reference, model_files):
    ssd = tmp_path / "ssd"
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, ssd_dir=str(ssd), kv_chunk_tokens=32))
    msgs = [{"role": "user", "content": TURNS[0]}]
    first = answer(engine, "1", engine.tokenizer.encode_chat(msgs), "s")
    engine.close()
    files = sorted(p for p in ssd.rglob("*") if p.is_file())
    assert files
    victim = files[0]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # flip a payload byte
    victim.write_bytes(bytes(data))

    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, ssd_dir=str(ssd), kv_chunk_tokens=32))
    msgs += [{"role": "assistant", "content": first[1]}, {"role": "user", "content": TURNS[1]}]
    ids = engine.tokenizer.encode_chat(msgs)
    got = answer(engine, "2", ids, "s")
    # Start-up read only the header; the payload's CRC failed when the chunk was first read for this turn,
    # and the output is the recomputation's.
    assert engine.store.stats()["corrupt_chunks_discarded"] >= 1
    assert got[0] == answer(reference, "2", ids, None)[0]
    engine.close()

    # "Another model": the same weights under a changed config is another fingerprint.
    other = tmp_path / "other-model"
    shutil.copytree(model_files.directory, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"strata_test_marker": 1}))
    foreign = LLMEngine(EngineConfig(dtype="float32", model=str(other), kv_cache_gb=0.1, ssd_dir=str(ssd),
                                     kv_chunk_tokens=32))
    assert foreign.files.fingerprint != model_files.fingerprint
    assert foreign.store.stats()["corrupt_chunks_discarded"] >= 1
    again = answer(foreign, "3", ids, "s")
    assert again[2] == 0 and again[0] == got[0]
    foreign.close()


def test_capacities_hold_under_many_sessions(tmp_path):
    dram, ssd_bytes = 300 * TIER_BYTES_PER_TOKEN, 1500 * TIER_BYTES_PER_TOKEN
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.05, ssd_dir=str(tmp_path), dram_kv_gb=dram / 2**30,
                                    ssd_kv_gb=ssd_bytes / 2**30, kv_chunk_tokens=32))
    for s in range(10):
        answer(engine, f"r{s}", engine.tokenizer.encode_chat([{"role": "user", "content": TURNS[s % 5] * 3}]),
               f"s{s}", n=8)
        engine.store.flush()
        st = engine.store.stats()
        assert st["occupancy_bytes_dram"] <= dram
        assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= ssd_bytes
    assert engine.store.stats()["evictions_dram"] > 0
    engine.close()


# --- the real server: tenants, headers, admin endpoints, kill -9 during saves ---


def chat(client: openai.OpenAI, msgs: list[dict], session: str | None) -> tuple[str, int, str]:
    headers = {"X-Session-ID": session} if session else {}
    raw = client.chat.completions.with_raw_response.create(
        model=client.models.list().data[0].id, messages=msgs, max_tokens=16, temperature=0, extra_headers=headers)
    r = raw.parse()
    assert int(raw.headers["x-cached-tokens"]) == r.usage.prompt_tokens_details.cached_tokens
    return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens, raw.headers["x-cache-tier"]


@pytest.fixture(scope="module")
def tenant_server(tmp_path_factory, model_files):
    d = tmp_path_factory.mktemp("tenants")
    srv = ServerProcess("--kv-cache-gb", "0.1", "--api-key", "key-a,key-b", "--ssd-dir", str(d / "ssd"),
                        log=d / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_tenants_never_share_sessions(tenant_server):
    base = tenant_server.base_url
    a = openai.OpenAI(base_url=base + "/v1", api_key="key-a", max_retries=0, _strict_response_validation=True)
    b = openai.OpenAI(base_url=base + "/v1", api_key="key-b", max_retries=0, _strict_response_validation=True)
    msgs = [{"role": "user", "content": TURNS[0]}]
    text, cached, tier = chat(a, msgs, "shared-id")
    assert cached == 0 and tier == "none"
    _, cached_again, tier_again = chat(a, msgs + [{"role": "assistant", "content": text},
                                                  {"role": "user", "content": TURNS[1]}], "shared-id")
    assert cached_again > 0 and tier_again == "hbm"
    # Tenant B, same session id, same first message: nothing of A's is reused or visible.
    _, cached_b, tier_b = chat(b, msgs, "shared-id")
    assert cached_b == 0 and tier_b == "none"
    hb = {"Authorization": "Bearer key-b"}
    ha = {"Authorization": "Bearer key-a"}
    info_a = httpx.get(base + "/v1/sessions/shared-id", headers=ha).json()
    info_b = httpx.get(base + "/v1/sessions/shared-id", headers=hb).json()
    assert info_a["tokens"] > info_b["tokens"] > 0
    assert httpx.get(base + "/v1/sessions/shared-id").status_code == 401
    assert httpx.delete(base + "/v1/sessions/shared-id", headers=hb).json()["deleted"] is True
    assert httpx.get(base + "/v1/sessions/shared-id", headers=hb).status_code == 404
    assert httpx.get(base + "/v1/sessions/shared-id", headers=ha).status_code == 200
    pinned = httpx.post(base + "/v1/sessions/shared-id/pin", headers=ha, json={"seconds": 60})
    assert pinned.status_code == 200 and httpx.get(base + "/v1/sessions/shared-id", headers=ha).json()[
        "pinned_until"] > time.time() + 50
    assert httpx.post(base + "/v1/sessions/shared-id/pin", headers=hb, json={"seconds": 60}).status_code == 404
    assert httpx.post(base + "/v1/sessions/shared-id/pin", headers=ha, json={"seconds": -5}).status_code == 400
    assert [s["id"] for s in httpx.get(base + "/v1/sessions", headers=ha).json()["data"]] == ["shared-id"]


@pytest.mark.slow
def test_kill_9_during_saves_then_restart(tmp_path, model_files):
    ssd = tmp_path / "ssd"
    off = ServerProcess("--kv-cache-gb", "0.1", "--no-session-cache", log=tmp_path / "off.log")
    srv = ServerProcess("--kv-cache-gb", "0.1", "--ssd-dir", str(ssd), log=tmp_path / "on.log")
    try:
        off.wait_ready()
        srv.wait_ready()
        c_off = openai.OpenAI(base_url=off.base_url + "/v1", api_key="x", max_retries=0)
        c_on = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        msgs: list[dict] = []
        for i in range(2):
            msgs.append({"role": "user", "content": TURNS[i]})
            text, _, _ = chat(c_on, msgs, "k9")
            assert text == chat(c_off, msgs, None)[0]
            msgs.append({"role": "assistant", "content": text})
        # A long generation keeps saves flowing; kill -9 in the middle of it.
        stream = c_on.chat.completions.create(model=c_on.models.list().data[0].id, stream=True, max_tokens=400,
                                              messages=msgs + [{"role": "user", "content": TURNS[2]}],
                                              extra_headers={"X-Session-ID": "k9"}, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 30:
                srv.proc.send_signal(signal.SIGKILL)
                break
        srv.proc.wait(30)
        time.sleep(0.5)
        again = ServerProcess("--kv-cache-gb", "0.1", "--ssd-dir", str(ssd), log=tmp_path / "again.log")
        try:
            again.wait_ready()
            c_again = openai.OpenAI(base_url=again.base_url + "/v1", api_key="x", max_retries=0)
            msgs.append({"role": "user", "content": TURNS[3]})
            text, cached, tier = chat(c_again, msgs, "k9")
            assert text == chat(c_off, msgs, None)[0]
            # Turns that finished before the kill were written back; whatever the kill cut is not served.
            assert tier == "ssd" and cached > 0
            assert again.metric("strata_kv_load_failures_total") == 0
        finally:
            again.stop()
    finally:
        srv.stop()
        off.stop()
