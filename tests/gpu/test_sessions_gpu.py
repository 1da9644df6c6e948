"""Session KV reuse on the GPU: history loaded from DRAM (pinned, copy kernel on its stream) and from SSD
answers exactly as recomputation on the same GPU, in the engine and through the HTTP server."""

from __future__ import annotations

import openai
import pytest
import torch

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from tests.conftest import TIER_BYTES_PER_TOKEN, ServerProcess
from tests.test_sessions import TURNS, answer, chat

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setenv("STRATA_DEVICE", "cuda")


def test_every_tier_on_gpu_serves_what_recomputation_serves(tmp_path, on_gpu):
    reference = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, session_cache=False))
    cfg = EngineConfig(dtype="float32", kv_cache_gb=0.1, ssd_dir=str(tmp_path),
                       dram_kv_gb=256 * TIER_BYTES_PER_TOKEN / 2**30, kv_chunk_tokens=32)
    engine = LLMEngine(cfg)
    assert engine.pool.kv.is_cuda and engine.store is not None
    histories: dict[str, list[dict[str, str]]] = {"a": [], "b": []}
    tiers: set[str] = set()

    def turn(eng: LLMEngine, key: str, i: int, from_store: bool) -> str | None:
        msgs = histories[key] + [{"role": "user", "content": TURNS[i]}]
        ids = eng.tokenizer.encode_chat(msgs)
        if from_store:
            eng.kv.cache.drop(key)  # not in device memory: the history must come from DRAM or SSD
            eng.store.flush()
        got = answer(eng, f"{key}{i}", ids, key)
        assert got[0] == answer(reference, f"{key}{i}", ids, None)[0], f"turn {i} of {key} from {got[3]}"
        histories[key] = msgs + [{"role": "assistant", "content": got[1]}]
        if got[3]:
            tiers.add(got[3])
        return got[3]

    for i in range(4):
        turn(engine, "a", i, i >= 2)
        turn(engine, "b", i, i >= 2)
    assert tiers >= {"hbm", "dram", "ssd"}, tiers
    stats = engine.store.stats()
    assert stats["load_errors"] == 0 and stats["bytes_loaded_dram"] > 0 and stats["bytes_loaded_ssd"] > 0
    engine.close()
    restarted = LLMEngine(cfg)
    assert turn(restarted, "b", 4, False) == "ssd"
    restarted.close()


def test_server_on_gpu_sessions_equal_recompute(tmp_path):
    env = {"STRATA_DEVICE": "cuda"}
    off = ServerProcess("--kv-cache-gb", "0.1", "--no-session-cache", env=env, log=tmp_path / "off.log")
    # A device pool of a few hundred tokens and a DRAM tier of ~100: later turns come from DRAM and SSD.
    on = ServerProcess("--kv-cache-gb", "0.03", "--dram-kv-gb", "0.005", "--ssd-dir", str(tmp_path / "ssd"),
                       env=env, log=tmp_path / "on.log")
    try:
        off.wait_ready()
        on.wait_ready()
        c_off = openai.OpenAI(base_url=off.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        c_on = openai.OpenAI(base_url=on.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        histories: dict[str, list[dict[str, str]]] = {k: [] for k in ("s1", "s2", "s3")}
        tiers: list[str] = []
        for i in range(3):
            for key, msgs in histories.items():
                msgs.append({"role": "user", "content": TURNS[i]})
                text, cached, tier = chat(c_on, msgs, key)
                assert text == chat(c_off, msgs, None)[0], f"{key} turn {i} from {tier}"
                msgs.append({"role": "assistant", "content": text})
                if i > 0:
                    assert cached > 0
                    tiers.append(tier)
        assert {"dram", "ssd"} & set(tiers), tiers
        assert on.metric("strata_kv_load_failures_total") == 0
    finally:
        on.stop()
        off.stop()


def test_tier_loads_racing_aborts_on_gpu(tmp_path):
    """The same race on the GPU: loads run on their own CUDA stream (tests/test_session_races.py)."""
    from tests.test_session_races import loads_racing_aborts

    loads_racing_aborts(tmp_path, device="cuda")
