"""Sessions behind one long system prompt share its KV (real server, the openai client): new sessions reuse it
and answer exactly as a server without sessions does; tenants share nothing; a deletion leaves the others
served; a session editing its history inside a shared chunk changes no other session's KV; kill -9 and a
restart keep the sharing, served from SSD."""

from __future__ import annotations

import signal
import time

import httpx
import openai
import pytest

from tests.conftest import ServerProcess

# About 600 tokens: two whole 256-token chunks are shared.
SYSTEM = " ".join(
    f"Rule {i}: when the user asks about topic number {i}, answer in at most two sentences, cite the handbook "
    f"section {i * 7 % 31}, and never mention rule {(i * 3) % 40}." for i in range(24))
EDITED = SYSTEM.replace("Rule 11:", "Guideline 11:")  # inside the second chunk
SHARED = 512
QUESTIONS = ["What is the moon made of?", "Name three rivers in Africa.", "Why is the sky blue?",
             "How do bees make honey?", "What is a prime number?"]


def client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0,
                         _strict_response_validation=True)


def ask(c: openai.OpenAI, msgs: list[dict], session: str | None) -> tuple[str, int, str, int]:
    """(text, cached tokens, tier, shared tokens)."""
    raw = c.chat.completions.with_raw_response.create(
        model=c.models.list().data[0].id, messages=msgs, max_tokens=12, temperature=0,
        extra_headers={"X-Session-ID": session} if session else {})
    r = raw.parse()
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert int(raw.headers["x-cached-tokens"]) == cached
    shared = int(raw.headers["x-cached-shared-tokens"])
    assert 0 <= shared <= cached
    return r.choices[0].message.content, cached, raw.headers["x-cache-tier"], shared


def first_turn(system: str, i: int) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i]}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, model_files):
    d = tmp_path_factory.mktemp("shared")
    on = ServerProcess("--kv-cache-gb", "0.1", "--api-key", "key-a,key-b", "--ssd-dir", str(d / "ssd"),
                       log=d / "on.log")
    off = ServerProcess("--kv-cache-gb", "0.1", "--no-session-cache", "--api-key", "key-a", log=d / "off.log")
    try:
        on.wait_ready()
        off.wait_ready()
        yield on, off
    finally:
        on.stop()
        off.stop()


def test_sharing_across_sessions_tenants_deletion_and_divergence(servers):
    on, off = servers
    a, b, oracle = client(on, "key-a"), client(on, "key-b"), client(off, "key-a")
    want = {i: ask(oracle, first_turn(SYSTEM, i), None)[0] for i in range(4)}

    text, cached, tier, _ = ask(a, first_turn(SYSTEM, 0), "sess-0")
    assert (text, cached, tier) == (want[0], 0, "none")
    for i in (1, 2):  # new sessions: the system prompt comes from the store, shared
        text, cached, tier, shared = ask(a, first_turn(SYSTEM, i), f"sess-{i}")
        assert text == want[i]
        assert cached >= SHARED and shared >= SHARED and tier == "dram", (cached, shared, tier)
    assert on.metric("strata_kv_shared_chunks") >= 2
    assert on.metric("strata_kv_bytes_without_sharing", tier="dram") > on.metric("strata_kv_occupancy_bytes",
                                                                                  tier="dram")

    # Another tenant with the same prompt: nothing of tenant a's.
    text, cached, tier, shared = ask(b, first_turn(SYSTEM, 0), "sess-0")
    assert (text, cached, tier, shared) == (want[0], 0, "none", 0)

    # Deleting the session that computed it leaves it to the others, and to new sessions.
    h = {"Authorization": "Bearer key-a"}
    assert httpx.delete(on.base_url + "/v1/sessions/sess-0", headers=h).json()["deleted"] is True
    text, cached, _, shared = ask(a, first_turn(SYSTEM, 3), "sess-3")
    assert text == want[3] and cached >= SHARED and shared >= SHARED

    # sess-1 edits its system prompt inside the second shared chunk: it keeps a copy of what still matches,
    # and nobody else's KV changes (each answer is recomputation's).
    msgs1 = first_turn(EDITED, 1) + [{"role": "assistant", "content": "Noted."},
                                     {"role": "user", "content": QUESTIONS[4]}]
    text, cached, _, _ = ask(a, msgs1, "sess-1")
    assert text == ask(oracle, msgs1, None)[0] and SHARED // 2 <= cached < SHARED
    for i in (2, 3):
        msgs = first_turn(SYSTEM, i) + [{"role": "assistant", "content": want[i]},
                                        {"role": "user", "content": QUESTIONS[4]}]
        text, cached, _, _ = ask(a, msgs, f"sess-{i}")
        assert text == ask(oracle, msgs, None)[0] and cached >= SHARED
    text, cached, _, shared = ask(a, first_turn(SYSTEM, 4), "sess-4")
    assert text == ask(oracle, first_turn(SYSTEM, 4), None)[0] and shared >= SHARED


@pytest.mark.slow
def test_kill_9_and_restart_keep_the_sharing_from_ssd(tmp_path, servers):
    _, off = servers
    oracle = client(off, "key-a")
    # DRAM smaller than the shared prefix: it lives on SSD. Lossless tiers: recomputation is the exact oracle.
    args = ("--kv-cache-gb", "0.1", "--api-key", "key-a", "--ssd-dir", str(tmp_path / "ssd"), "--dram-kv-gb", "0.02",
            "--kv-tier-dtype", "model")
    srv = ServerProcess(*args, log=tmp_path / "on.log")
    try:
        srv.wait_ready()
        c = client(srv, "key-a")
        answers = {i: ask(c, first_turn(SYSTEM, i), f"k-{i}")[0] for i in range(2)}
        deadline = time.monotonic() + 30
        while srv.metric("strata_kv_ssd_io_queue") or srv.metric("strata_kv_save_queue_bytes"):
            assert time.monotonic() < deadline, "write-back never finished"
            time.sleep(0.2)
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(30)
    finally:
        srv.stop()
    again = ServerProcess(*args, log=tmp_path / "again.log")
    try:
        again.wait_ready()
        c = client(again, "key-a")
        assert again.metric("strata_kv_shared_chunks") >= 2
        for i in range(2):  # the sessions go on from SSD, sharing
            msgs = first_turn(SYSTEM, i) + [{"role": "assistant", "content": answers[i]},
                                            {"role": "user", "content": QUESTIONS[4]}]
            text, cached, tier, shared = ask(c, msgs, f"k-{i}")
            assert text == ask(oracle, msgs, None)[0]
            assert tier == "ssd" and cached >= SHARED and shared >= SHARED, (tier, cached, shared)
        text, cached, tier, shared = ask(c, first_turn(SYSTEM, 2), "k-new")  # and a new one starts from it
        assert text == ask(oracle, first_turn(SYSTEM, 2), None)[0]
        assert tier == "ssd" and shared >= SHARED
        assert again.metric("strata_kv_load_failures_total") == 0
    finally:
        again.stop()
