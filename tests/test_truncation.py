"""Context overflow: truncated history served from re-rotated stored KV (CachedAttention "Positions").

The perplexity test drives the model directly over a real BlockPool and KVStore: a long
context is stored, cut to its first and last tokens with ``KVStore.truncate``, and the
following tokens are scored on top of (a) a recompute of the cut text, (b) the re-rotated
stored KV, (c) the kept KV left at its old positions.
"""

from __future__ import annotations

import importlib
import json
import math
import pydoc

import httpx
import pytest
import torch
import torch.nn.functional as F

from strata.engine.models.attention_batch import AttentionBatch, PrefillSlice
from strata.engine.models.llama import LlamaModel
from strata.engine.tokenizer import Tokenizer
from strata.server.overflow import dropped_range, fit_messages
from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVStore
from tests.conftest import ServerProcess, started

EMPTY = torch.zeros(0, dtype=torch.long)
BS = 16
CONTEXT, HEAD, TAIL, FOLLOW = 2048, 16, 1024, 256


def prefill(model: LlamaModel, pool: BlockPool, table: BlockTable, ids: list[int], history: int,
            first_position: int) -> torch.Tensor:
    """Run ``ids`` after ``history`` cached tokens (slots [0, history) of ``table``); logits per token.

    ``first_position`` is the rotary position of ids[0]: normally ``history``, but it may differ to
    model keys cached at positions that do not match their slots.
    """
    n = len(ids)
    new = table.slots(BS, history, history + n)
    ctx = table.slots(BS, 0, history + n) if history else None
    batch = AttentionBatch(new, [PrefillSlice(0, n, history, ctx)], EMPTY,
                           torch.zeros(pool.num_layers, 0, 1, dtype=torch.long), EMPTY)
    positions = torch.arange(first_position, first_position + n)
    with torch.inference_mode():
        return model.logits(model.forward(torch.tensor(ids), positions, batch, pool.kv))


def perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    """logits[i] predicts targets[i]."""
    return math.exp(F.cross_entropy(logits[: len(targets)], torch.tensor(targets)).item())


def document(tokenizer: Tokenizer, module: str) -> list[int]:
    """Long English text: a standard module's rendered docs."""
    text = pydoc.render_doc(importlib.import_module(module), renderer=pydoc.plaintext)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= CONTEXT + FOLLOW + 1
    return ids[: CONTEXT + FOLLOW + 1]


def three_ways(model: LlamaModel, ids: list[int], tmp_path) -> tuple[float, float, float]:
    """Perplexity of the FOLLOW tokens after the cut context: (recompute, re-rotated, unrotated)."""
    cfg = model.cfg
    pool = BlockPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, BS,
                     cfg.num_hidden_layers * (2 * (CONTEXT + FOLLOW) // BS + 8), torch.float32)
    store = KVStore(pool, model_fingerprint="ppl", dram_bytes=2**30, ssd_dir=tmp_path / "ssd", ssd_bytes=2**30,
                    rope_inv_freq=model.inv_freq)
    context, follow = ids[:CONTEXT], ids[CONTEXT:]
    kept = context[:HEAD] + context[CONTEXT - TAIL:]
    targets = follow[1:]  # the model sees follow[i] and predicts follow[i + 1]
    try:
        # The full context once, stored as a session would be.
        table = BlockTable.allocate(pool, CONTEXT)
        prefill(model, pool, table, context, 0, 0)
        store.save("s", context, table, 0, CONTEXT)
        store.finish("s", context)
        store.flush()
        old_kv = pool.read(table.slots(BS, 0, CONTEXT))
        table.release(pool)

        # (a) the cut text recomputed from scratch.
        table = BlockTable.allocate(pool, len(kept) + len(follow))
        ref = prefill(model, pool, table, kept + follow, 0, 0)[len(kept):]
        table.release(pool)

        # (b) the stored KV truncated (re-rotated), loaded into fresh blocks; only FOLLOW runs.
        assert store.truncate("s", HEAD, CONTEXT - TAIL) == len(kept)
        assert store.lookup("s", kept + follow).tokens == len(kept)
        table = BlockTable.allocate(pool, len(kept) + len(follow))
        handle = store.start_load("s", kept, len(kept), table)
        for layer in range(cfg.num_hidden_layers):
            store.wait_layer(handle, layer, timeout=30)
        rotated = prefill(model, pool, table, follow, len(kept), len(kept))

        # (c) the same kept KV at its old positions (no re-rotation); FOLLOW at the new positions.
        pool.write(table.slots(BS, 0, len(kept)), torch.cat([old_kv[:, :, :HEAD], old_kv[:, :, CONTEXT - TAIL:]], 2))
        unrotated = prefill(model, pool, table, follow, len(kept), len(kept))
        table.release(pool)
    finally:
        store.close()
    return perplexity(ref, targets), perplexity(rotated, targets), perplexity(unrotated, targets)


# One text by default (about 30 s on 2 cores); the second only in the slow run.
@pytest.mark.parametrize("module", ["json", pytest.param("collections", marks=pytest.mark.slow)])
def test_rerotated_kv_matches_recompute_perplexity(model, tokenizer, module, tmp_path):
    recompute, rotated, unrotated = three_ways(model, document(tokenizer, module), tmp_path)
    print(f"{module}: recompute {recompute:.3f} re-rotated {rotated:.3f} unrotated {unrotated:.1f}")
    assert abs(rotated - recompute) <= 0.02 * recompute
    assert unrotated > 2 * recompute


# ---------------------------------------------------------------------------------------- the feature

LIMIT, MAX_TOKENS = 512, 24
PARAGRAPHS = [
    "The moon is Earth's only natural satellite. It orbits at an average distance of about 384,400 kilometres, "
    "roughly thirty times the diameter of Earth, and always shows the same face to us because its rotation is "
    "locked to its orbit. Its surface is covered in craters, dark basaltic plains called maria, and fine dust.",
    "Tides on Earth are raised mostly by the moon's gravity. Two bulges of water follow the moon around the "
    "planet, so most coasts see two high tides and two low tides every day. The sun adds its own smaller pull, "
    "which makes spring tides when the two line up and neap tides when they are at right angles.",
    "Apollo 11 landed in the Sea of Tranquility in July 1969. Neil Armstrong and Buzz Aldrin spent about two "
    "and a half hours outside the lunar module, collected rock samples, and set up experiments, while Michael "
    "Collins stayed in orbit aboard the command module Columbia waiting for their return.",
    "Lunar rocks brought back by the Apollo missions are rich in anorthosite and basalt. Their ages, measured "
    "from radioactive isotopes, reach back more than four billion years, which supports the idea that the moon "
    "formed from debris thrown out when a Mars-sized body struck the young Earth.",
    "Future missions plan to return people to the moon and to build a small station in lunar orbit. Water ice "
    "in permanently shadowed craters near the south pole could supply drinking water, oxygen, and rocket fuel, "
    "which makes that region the most likely site for a long-term base.",
    "A lunar eclipse happens when Earth passes between the sun and the full moon. Sunlight bent through Earth's "
    "atmosphere still reaches the moon, so it glows a deep copper red instead of vanishing, and anyone on the "
    "night side of the planet can watch the whole event without any special equipment.",
    "The moon is slowly moving away from Earth, by about three point eight centimetres every year. Tidal "
    "friction transfers angular momentum from Earth's spin to the moon's orbit, so our days are getting "
    "longer very gradually, and hundreds of millions of years ago a day lasted only about twenty-two hours.",
]


def chat(srv: ServerProcess, messages: list[dict], session: str | None) -> httpx.Response:
    model = httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    headers = {"X-Session-ID": session} if session else {}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The same small context with sessions, without sessions, and with --context-overflow error."""
    d = tmp_path_factory.mktemp("overflow")
    common = ("--max-model-len", str(LIMIT), "--kv-cache-gb", "0.1")
    procs = {"sessions": ServerProcess(*common, log=d / "sessions.log"),
             "reference": ServerProcess(*common, "--no-session-cache", log=d / "reference.log"),
             "error": ServerProcess(*common, "--context-overflow", "error", log=d / "error.log")}
    with started(procs):
        yield procs


def same_up_to_near_ties(ours: httpx.Response, ref: httpx.Response, tolerance: float = 0.3) -> None:
    """Greedy answers agree, or first differ where the recompute had a near-tie.

    The kept KV was computed with the dropped turns in view (the method's approximation, see
    the perplexity test), so a token the recompute ranks within ``tolerance`` nats of its top
    choice may win instead.
    """
    a = ours.json()["choices"][0]["logprobs"]["content"]
    b = ref.json()["choices"][0]["logprobs"]["content"]
    for x, y in zip(a, b, strict=False):
        if x["token"] != y["token"]:
            alternatives = {t["token"]: t["logprob"] for t in y["top_logprobs"]}
            assert x["token"] in alternatives, (x, y)
            assert alternatives[x["token"]] >= y["logprob"] - tolerance, (x, y)
            return
    assert len(a) == len(b)


def test_overflowing_conversation_is_truncated_and_reuses_the_session(servers, tokenizer):
    srv, ref = servers["sessions"], servers["reference"]
    messages = [{"role": "system", "content": "You are a concise assistant who answers questions about the moon."}]
    truncated_turns = 0
    for i, text in enumerate(PARAGRAPHS):
        messages.append({"role": "user", "content": text + " Explain this in one sentence."})
        r = chat(srv, messages, "moon")
        assert r.status_code == 200, r.text
        dropped, cached = int(r.headers["X-Truncated-Tokens"]), int(r.headers["X-Cached-Tokens"])
        answer = r.json()["choices"][0]["message"]["content"]
        full = tokenizer.encode_chat(messages)
        if dropped:
            truncated_turns += 1
            fitted = fit_messages(tokenizer.encode_chat, messages, full, LIMIT - MAX_TOKENS)
            assert fitted is not None and fitted.dropped_tokens == dropped
            assert fitted.messages[0] == messages[0] and fitted.messages[-1] == messages[-1]
            assert fitted.truncation is not None  # ChatML: one contiguous token range
            prompt = fitted.prompt_ids
            assert r.json()["usage"]["prompt_tokens"] == len(prompt)
            # Everything but the new user message came from the session's re-rotated KV (a few tokens
            # of slack: the last answer's final tokens may tokenize differently when sent back).
            new = len(prompt) - len(tokenizer.encode_chat(fitted.messages[:-1], add_generation_prompt=False))
            assert cached >= len(prompt) - new - 8, (i, cached, len(prompt), new)
            assert r.headers["X-Cache-Tier"] in ("dram", "ssd")
            # A server without sessions recomputing the same kept messages answers the same.
            expected = chat(ref, fitted.messages, None)
            assert int(expected.headers["X-Truncated-Tokens"]) == 0
            same_up_to_near_ties(r, expected)
        else:
            assert len(full) + MAX_TOKENS <= LIMIT
        messages.append({"role": "assistant", "content": answer})
    assert truncated_turns >= 2  # a session already truncated is truncated again


def test_overflow_error_mode_keeps_the_400(servers):
    messages = [{"role": "system", "content": "Be brief."}]
    for text in PARAGRAPHS:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    r = chat(servers["error"], messages + [{"role": "user", "content": "Summarize."}], "e")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = chat(servers["sessions"], messages + [{"role": "user", "content": "Summarize."}], None)
    assert r.status_code == 200 and int(r.headers["X-Truncated-Tokens"]) > 0


def test_responses_truncate_as_chat_does(servers):
    """The Responses endpoint fits an overflowing conversation as chat does: the same X-Truncated-Tokens,
    prompt tokens and answer for the same messages."""
    srv = servers["reference"]
    model = httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
    messages = [{"role": "system", "content": "Be brief."}]
    for text in PARAGRAPHS:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    messages.append({"role": "user", "content": "Summarize."})
    r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200 and int(r.headers["X-Truncated-Tokens"]) > 0
    for stream in (False, True):
        resp = httpx.post(srv.base_url + "/v1/responses", timeout=120, json={
            "model": model, "input": messages, "max_output_tokens": MAX_TOKENS, "temperature": 0, "stream": stream})
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Truncated-Tokens"] == r.headers["X-Truncated-Tokens"]
        if stream:
            last = json.loads(resp.text.rstrip().rsplit("data: ", 1)[1])
            assert last["type"] in ("response.completed", "response.incomplete")
            body = last["response"]
        else:
            body = resp.json()
        assert body["usage"]["input_tokens"] == r.json()["usage"]["prompt_tokens"]
        text = "".join(p["text"] for item in body["output"] for p in item["content"])
        assert text == r.json()["choices"][0]["message"]["content"]


def test_fit_messages_drops_oldest_whole_messages(tokenizer):
    msgs = [{"role": "system", "content": "S"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": PARAGRAPHS[i % 5]} for i in range(7)]
    full = tokenizer.encode_chat(msgs)
    fitted = fit_messages(tokenizer.encode_chat, msgs, full, 300)
    assert fitted is not None and len(fitted.prompt_ids) <= 300
    kept = fitted.messages
    assert kept[0] == msgs[0] and kept[1:] == msgs[len(msgs) - len(kept) + 1:]
    # the fewest: one more message would not fit
    assert len(tokenizer.encode_chat([msgs[0]] + msgs[len(msgs) - len(kept):])) > 300
    head, end = fitted.truncation
    assert full[:head] + full[end:] == fitted.prompt_ids
    assert fit_messages(tokenizer.encode_chat, msgs, full, 20) is None  # the last message alone is too long
    assert dropped_range([1, 2, 3, 4, 5], [1, 4, 5]) == (1, 3)
    assert dropped_range([1, 2, 3, 4, 5], [1, 9, 5]) is None
