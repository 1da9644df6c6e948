"""The shared KV tier (--remote-kv) with a real redis-server: a session served by one server continues on
another from the shared tier (X-Cache-Tier: remote) with the output of a sessions-off server; tenants stay
apart; corrupt remote data is never served; redis stopped mid-run costs recomputation, never an error."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import redis
from openai import OpenAI

from tests.conftest import ServerProcess, started

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from cluster import RedisServer  # noqa: E402

TURNS = ["Tell me about the moon.", "How far away is it?", "Could people live there?", "Why not?"]


def _client(srv: ServerProcess, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=srv.base_url + "/v1", api_key=key, _strict_response_validation=True, max_retries=0,
                  timeout=120)


def _turn(client: OpenAI, msgs: list[dict], session: str) -> tuple[str, int, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=client.models.list().data[0].id, messages=msgs, max_tokens=24, temperature=0,
        extra_headers={"X-Session-ID": session})
    reply = raw.parse()
    return (reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens,
            raw.headers["x-cache-tier"])


def _uploaded(srv: ServerProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(srv.metric(f"strata_kv_{q}") for q in ("save_queue_bytes", "ssd_io_queue", "remote_upload_queue")):
        assert time.monotonic() < deadline, "uploads to the shared tier did not drain"
        time.sleep(0.1)
    time.sleep(0.3)


@pytest.mark.slow
def test_a_session_moves_between_servers_through_the_shared_tier(tmp_path: Path):
    store = RedisServer(tmp_path / "redis")
    common = ("--kv-cache-gb", "0.1", "--api-key", "key-a,key-b", "--remote-kv", store.url)
    procs = {
        "a": ServerProcess(*common, "--ssd-dir", str(tmp_path / "a"), log=tmp_path / "a.log"),
        "b": ServerProcess(*common, "--ssd-dir", str(tmp_path / "b"), log=tmp_path / "b.log"),
        "off": ServerProcess("--kv-cache-gb", "0.1", "--no-session-cache", log=tmp_path / "off.log"),
    }
    try:
        with started(procs):
            a, b, off = _client(procs["a"], "key-a"), _client(procs["b"], "key-a"), _client(procs["off"])
            msgs: list[dict] = []
            for text in TURNS[:2]:  # two turns on server a
                msgs.append({"role": "user", "content": text})
                answer, _, _ = _turn(a, msgs, "moon")
                msgs.append({"role": "assistant", "content": answer})
            _uploaded(procs["a"])
            assert procs["a"].metric('strata_kv_remote_total{event="uploads"}') > 0

            # Another tenant with the same session id finds nothing (keys are tenant-scoped).
            other = _client(procs["b"], "key-b")
            probe = msgs + [{"role": "user", "content": TURNS[2]}]
            _, cached, tier = _turn(other, probe, "moon")
            assert tier == "none" and cached < 32, (tier, cached)

            # The session moves to server b: its history comes from the shared tier.
            msgs.append({"role": "user", "content": TURNS[2]})
            answer, cached, tier = _turn(b, msgs, "moon")
            assert tier == "remote" and cached > 0, (tier, cached)
            assert answer == off.chat.completions.create(model=off.models.list().data[0].id, messages=msgs,
                                                         max_tokens=24, temperature=0).choices[0].message.content
            assert procs["b"].metric('strata_kv_hits_total{tier="remote"}') == 1

            # A corrupted chunk in the shared tier is detected (per-layer CRC) and never served.
            r = redis.Redis.from_url(store.url)
            for key in r.keys("strata:*"):
                blob = bytearray(r.get(key))
                blob[-10] ^= 0xFF
                r.set(key, bytes(blob))
            c = _client(procs["b"], "key-b")
            fresh = [{"role": "user", "content": TURNS[0]}]
            _turn(_client(procs["a"], "key-b"), fresh, "second")  # a writes a new session ...
            _uploaded(procs["a"])
            for key in r.keys("strata:*"):  # ... which is corrupted too
                blob = bytearray(r.get(key))
                blob[-10] ^= 0xFF
                r.set(key, bytes(blob))
            fresh += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": TURNS[1]}]
            _, cached, tier = _turn(c, fresh, "second")
            assert tier == "none" and cached < 32

            # A value larger than any chunk of this layout is refused before it is read into a file.
            third = [{"role": "user", "content": TURNS[1]}]
            _turn(_client(procs["a"], "key-b"), third, "third")
            _uploaded(procs["a"])
            before = set(r.keys("strata:*"))
            oversize = 'strata_kv_remote_total{event="chunks_discarded_oversize"}'
            for key in before:
                r.set(key, b"\0" * (64 << 20))
            third += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": TURNS[2]}]
            _, cached, tier = _turn(c, third, "third")
            assert tier == "none" and cached < 32
            assert procs["b"].metric(oversize) == 1

            # redis goes away mid-run: every request is still answered, from what each server holds.
            store.stop()
            msgs.append({"role": "assistant", "content": answer})
            msgs.append({"role": "user", "content": TURNS[3]})
            answer, cached, tier = _turn(b, msgs, "moon")
            assert answer and cached > 0
            t0 = time.monotonic()
            _, _, tier = _turn(a, [{"role": "user", "content": "Hello there."}], "new-session")
            assert tier == "none" and time.monotonic() - t0 < 30
            assert httpx_health(procs["a"]) and httpx_health(procs["b"])
    finally:
        store.stop()


def httpx_health(srv: ServerProcess) -> bool:
    import httpx

    return httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
