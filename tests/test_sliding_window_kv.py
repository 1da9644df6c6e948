"""Sliding-window layers keep only their window: device blocks go back to the pool while a sequence runs, and
the DRAM and SSD tiers give a chunk's windowed layers up once no later token reads them. Reuse stays exact:
a random Gemma 3 (5 local layers with a 64-token window : 1 global) continued from DRAM, and from SSD after a
restart, gives transformers' greedy tokens; the stored bytes per session are what the window predicts."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from tests.conftest import ServerProcess
from tests.test_model_families import random_dir

WINDOW, LAYERS, CHUNK = 64, 6, 256  # the random Gemma 3's window and layers; the tiers' chunk (default)


def test_a_windowed_layer_gives_back_the_blocks_no_later_token_reads():
    windows = (WINDOW, None)
    pool = BlockPool(2, 1, 4, 16, 64, torch.float32, "cpu", windows=windows)
    table = BlockTable(2)
    table.grow(pool, 200)  # 13 blocks per layer
    assert pool.num_free == 64 - 26
    # The next token (position 200) reads keys 137..199: blocks 0..7 (tokens 0..127) of layer 0 are dead.
    assert table.drop_outside_windows(pool, 200) == 8
    assert pool.num_free == 64 - 26 + 8 and table.num_blocks == 18
    slots = table.slots(16, 120, 140)
    assert (slots[0, :8] == -1).all() and (slots[0, 8:] >= 0).all() and (slots[1] >= 0).all()
    assert (table.tensor() >= 0).all()  # attention reads holes as block 0, masked
    assert table.window_intact(pool, 200) and not table.window_intact(pool, 150)
    table.cut(pool, 150)
    table.release(pool)
    assert pool.num_free == 64
    # A history loaded from a tier: its windowed layer gets blocks only from its window on.
    loaded = BlockTable.allocate(pool, 200)
    assert loaded.num_blocks == 13 + 5 == pool.blocks_for_history(200) and loaded.dropped == [8, 0]
    assert pool.blocks_for_sequence(10_000, 64) == 625 + pool.blocks_for(WINDOW + 64) + 1


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, model_files):
    return random_dir(tmp_path_factory.mktemp("swa"), model_files, "gemma3")


def reference(directory, prompt: list[int], new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()


def layer_token_bytes() -> int:
    return 2 * 2 * 32 * 4  # K and V, 2 kv heads of 32 dims, float32


def predicted_bytes(tokens: int) -> int:
    """Whole chunks a window before the end keep the global layer; the rest keep all six."""
    trimmed = max(0, (tokens - WINDOW + 1) // CHUNK)
    return layer_token_bytes() * (trimmed * CHUNK * 1 + (tokens - trimmed * CHUNK) * LAYERS)


def test_a_session_continues_from_windowed_kv_in_dram_and_on_ssd(gemma_dir, tmp_path):
    gen = torch.Generator().manual_seed(5)
    first = [int(t) for t in torch.randint(3, 49152, (700,), generator=gen)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    ssd = tmp_path / "ssd"
    # A pool of ~200 blocks (one session's history and the next one's prefill), prefill in 128-token steps.
    # Lossless tiers: transformers is the exact oracle, and the stored bytes are the model dtype's.
    flags = ("--model", str(gemma_dir), "--kv-cache-gb", "0.0016", "--max-num-batched-tokens", "128",
             "--ssd-dir", str(ssd), "--kv-tier-dtype", "model")

    def turn(srv: ServerProcess, prompt: list[int], session: str) -> tuple[list[int], int, str]:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        raw = c.completions.with_raw_response.create(model="gemma3", prompt=prompt, max_tokens=12, temperature=0,
                                                     extra_body={"ignore_eos": True},
                                                     extra_headers={"X-Session-ID": session})
        r = raw.parse()
        ids = tokenizer.encode(r.choices[0].text, add_special_tokens=False)
        return ids, r.usage.prompt_tokens_details.cached_tokens, raw.headers["x-cache-tier"]

    def ref(prompt: list[int]) -> list[int]:  # as text, then tokens: what the server's text can be held to
        return tokenizer.encode(tokenizer.decode(reference(gemma_dir, prompt, 12), skip_special_tokens=True),
                                add_special_tokens=False)

    srv = ServerProcess(*flags, log=tmp_path / "server1.log")
    try:
        srv.wait_ready()
        out1, _, _ = turn(srv, first, "s")
        assert out1 == ref(first)
        # Other sessions push it out of the device pool: the next turn loads it from DRAM.
        for k in range(3):
            turn(srv, [int(t) for t in torch.randint(3, 49152, (600,), generator=gen)], f"other{k}")
        second = first + out1 + [int(t) for t in torch.randint(3, 49152, (40,), generator=gen)]
        out2, cached, tier = turn(srv, second, "s")
        assert tier == "dram" and cached >= len(first), (tier, cached)
        assert out2 == ref(second)
        info = httpx.get(srv.base_url + "/v1/sessions/s", timeout=30).json()
        n = info["tokens"]
        full = layer_token_bytes() * n * LAYERS
        # DRAM chunks are allocated by capacity: the tail chunk may hold up to a chunk more than its tokens.
        assert predicted_bytes(n) <= info["dram_bytes"] <= predicted_bytes(n) + layer_token_bytes() * CHUNK * LAYERS
        assert info["dram_bytes"] < 0.6 * full, (info["dram_bytes"], full)
        assert srv.metric("strata_kv_occupancy_bytes", tier="dram") > 0
    finally:
        srv.stop()
    # A restart: the session comes back from its chunk files, the trimmed ones as they were written.
    srv = ServerProcess(*flags, log=tmp_path / "server2.log")
    try:
        srv.wait_ready()
        info = httpx.get(srv.base_url + "/v1/sessions/s", timeout=30).json()
        assert info["ssd_bytes"] < 0.6 * layer_token_bytes() * info["tokens"] * LAYERS + 16 * 4096, info
        third = second + out2 + [int(t) for t in torch.randint(3, 49152, (30,), generator=gen)]
        out3, cached, tier = turn(srv, third, "s")
        assert tier == "ssd" and cached >= len(second), (tier, cached)
        assert out3 == ref(third)
    finally:
        srv.stop()


def test_an_edit_before_a_trimmed_window_recomputes(gemma_dir, tmp_path):
    """A later turn that changes the history inside chunks whose windowed layers are gone cannot reuse
    them: the stored prefix it could continue from is cut back, and the output is still exact."""
    gen = torch.Generator().manual_seed(6)
    first = [int(t) for t in torch.randint(3, 49152, (700,), generator=gen)]
    srv = ServerProcess("--model", str(gemma_dir), "--kv-cache-gb", "0.05", log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        c.completions.create(model="gemma3", prompt=first, max_tokens=4, temperature=0,
                             extra_headers={"X-Session-ID": "e"})
        edited = first[:300] + [int(t) for t in torch.randint(3, 49152, (50,), generator=gen)]
        r = c.completions.with_raw_response.create(model="gemma3", prompt=edited, max_tokens=12, temperature=0,
                                                   extra_body={"ignore_eos": True},
                                                   extra_headers={"X-Session-ID": "e"})
        body = r.parse()
        # The window of position 300 reaches back into chunk 0 (tokens 0..255), trimmed: nothing reusable.
        assert body.usage.prompt_tokens_details.cached_tokens == 0
        from transformers import AutoTokenizer

        want = AutoTokenizer.from_pretrained(gemma_dir).decode(reference(gemma_dir, edited, 12),
                                                               skip_special_tokens=True)
        assert body.choices[0].text == want
    finally:
        srv.stop()
