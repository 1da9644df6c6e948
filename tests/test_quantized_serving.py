"""--quantization end to end: the server serves the quantized model, session KV reused from every tier equals
recomputation under the same weights, and stored KV never crosses a change of --quantization."""

from __future__ import annotations

import pytest

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from tests.conftest import ServerProcess, started
from tests.test_sessions import TURNS, answer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]  # float32 and int4 answer differently


@pytest.fixture(scope="module")
def int4_reference():
    return LLMEngine(EngineConfig(dtype="float32", quantization="int4", kv_cache_gb=0.1, session_cache=False))


@pytest.mark.slow
def test_server_serves_the_quantized_model(tmp_path, int4_reference):
    """The flag reaches the model: the server's greedy answer is the int4 engine's, not float32's."""
    from openai import OpenAI

    fp32 = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, session_cache=False))
    ids = int4_reference.tokenizer.encode_chat(FRANCE)
    want = answer(int4_reference, "france", ids, None)[1]
    assert want != answer(fp32, "france", ids, None)[1], "pick a prompt where the two models differ"
    with started({"s": ServerProcess("--quantization", "int4", "--kv-cache-gb", "0.1",
                                     log=tmp_path / "server.log")}) as procs:
        client = OpenAI(base_url=procs["s"].base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=FRANCE,
                                               max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == want


@pytest.mark.slow
def test_quantized_session_tiers_serve_what_recomputation_serves(tmp_path, int4_reference):
    cfg = EngineConfig(dtype="float32", quantization="int4", kv_cache_gb=0.1, ssd_dir=str(tmp_path),
                       kv_chunk_tokens=32)
    engine = LLMEngine(cfg)
    history: list[dict[str, str]] = []
    tiers = set()
    for i in range(3):
        msgs = [*history, {"role": "user", "content": TURNS[i]}]
        ids = engine.tokenizer.encode_chat(msgs)
        if i == 2:  # the history must come from the tiers, not the device pool
            engine.kv.cache.drop("q")
            engine.store.flush()
        got = answer(engine, f"q{i}", ids, "q")
        assert got[0] == answer(int4_reference, f"r{i}", ids, None)[0], f"turn {i} from {got[3]}"
        tiers.add(got[3])
        history = [*msgs, {"role": "assistant", "content": got[1]}]
    assert tiers & {"dram", "ssd"} and "hbm" in tiers, tiers
    engine.close()

    # A restart under other weights: the stored session is another model's KV, never served.
    other = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1, ssd_dir=str(tmp_path), kv_chunk_tokens=32))
    ids = other.tokenizer.encode_chat([*history, {"role": "user", "content": TURNS[3]}])
    _, _, cached, tier = answer(other, "after", ids, "q")
    assert cached == 0 and tier in (None, "none")
    other.close()
