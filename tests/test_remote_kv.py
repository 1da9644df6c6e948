"""The shared KV tier (--remote-kv) with a real redis-server set up as in production (TLS only, a password,
signed chunks): a session served by one server continues on another from the shared tier (X-Cache-Tier:
remote) with the output of a sessions-off server; tenants stay apart; corrupt, forged, malformed and oversized
values are never served and cost neither an error nor memory; a deletion sticks on every server; a server
without the password reads and writes nothing and still answers; redis stopped mid-run costs recomputation."""

from __future__ import annotations

import json
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from strata.storage.chunk_signing import ChunkSigner, parse_keys
from tests.conftest import ServerProcess, started

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from cluster import RedisServer  # noqa: E402

pytestmark = pytest.mark.slow

TURNS = ["Tell me about the moon.", "How far away is it?", "Could people live there?", "Why not?"]
CREATED = 8  # under the signature, before the chunk file's bytes: when the session was created


class Shared:
    def __init__(self, store: RedisServer, procs: dict[str, ServerProcess]) -> None:
        self.store = store
        self.procs = procs
        self.redis = store.client()
        self.signer = ChunkSigner(parse_keys(store.signing_key_file.read_text()))

    def chunk_keys(self) -> set[bytes]:
        return {k for k in self.redis.keys("strata:*") if not k.endswith(b":deleted")}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("remote")
    store = RedisServer(tmp / "redis")
    common = ("--kv-cache-gb", "0.1", "--api-key", "key-a,key-b", *store.strata_args())
    procs = {
        "a": ServerProcess(*common, "--ssd-dir", str(tmp / "a"), log=tmp / "a.log"),
        "b": ServerProcess(*common, "--ssd-dir", str(tmp / "b"), log=tmp / "b.log"),
        "off": ServerProcess("--kv-cache-gb", "0.1", "--no-session-cache", log=tmp / "off.log"),
    }
    try:
        with started(procs):
            yield Shared(store, procs)
    finally:
        store.stop()


def _client(srv: ServerProcess, key: str = "key-a") -> OpenAI:
    return OpenAI(base_url=srv.base_url + "/v1", api_key=key, _strict_response_validation=True, max_retries=0,
                  timeout=120)


def _turn(client: OpenAI, msgs: list[dict], session: str, max_tokens: int = 24) -> tuple[str, int, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=client.models.list().data[0].id, messages=msgs, max_tokens=max_tokens, temperature=0,
        extra_headers={"X-Session-ID": session})
    reply = raw.parse()
    return (reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens,
            raw.headers["x-cache-tier"])


def _solo(shared: Shared, msgs: list[dict]) -> str:
    off = _client(shared.procs["off"])
    return off.chat.completions.create(model=off.models.list().data[0].id, messages=msgs, max_tokens=24,
                                       temperature=0).choices[0].message.content


def _count(srv: ServerProcess, event: str) -> float:
    try:
        return srv.metric(f'strata_kv_remote_total{{event="{event}"}}')
    except KeyError:
        return 0.0


def _uploaded(srv: ServerProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(srv.metric(f"strata_kv_{q}") for q in ("save_queue_bytes", "ssd_io_queue", "remote_upload_queue")):
        assert time.monotonic() < deadline, "uploads to the shared tier did not drain"
        time.sleep(0.1)
    time.sleep(0.3)


def _new_session_on_a(shared: Shared, session: str, tenant: str = "key-b") -> tuple[list[dict], set[bytes]]:
    """One turn of a fresh session on server a, uploaded; returns its history and its keys in the store."""
    before = shared.chunk_keys()
    msgs = [{"role": "user", "content": TURNS[0]}]
    answer, _, _ = _turn(_client(shared.procs["a"], tenant), msgs, session)
    _uploaded(shared.procs["a"])
    keys = shared.chunk_keys() - before
    assert keys, "the session's chunks were not uploaded"
    return msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": TURNS[1]}], keys


def _forge(chunk: bytes, header_changes: dict | None = None) -> bytes:
    """A chunk with every K/V value zeroed and its CRCs made valid again (what an attacker who can write to
    the store crafts), header fields optionally replaced."""
    magic, length, _ = struct.unpack_from("<8sII", chunk)
    header = json.loads(chunk[16:16 + length])
    payload = bytes(len(chunk) - 16 - length)
    layer = len(payload) // header["num_layers"]
    header["layer_crc"] = [zlib.crc32(payload[i * layer:(i + 1) * layer]) for i in range(header["num_layers"])]
    header.update(header_changes or {})
    body = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<8sII", magic, len(body), zlib.crc32(body)) + body + payload


def _vm_hwm_kib(srv: ServerProcess) -> int:
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_session_moves_between_servers_through_the_shared_tier(shared: Shared):
    a, b = _client(shared.procs["a"]), _client(shared.procs["b"])
    msgs: list[dict] = []
    for text in TURNS[:2]:  # two turns on server a
        msgs.append({"role": "user", "content": text})
        answer, _, _ = _turn(a, msgs, "moon")
        msgs.append({"role": "assistant", "content": answer})
    _uploaded(shared.procs["a"])
    assert _count(shared.procs["a"], "uploads") > 0

    # Another tenant with the same session id finds nothing (keys are tenant-scoped).
    probe = msgs + [{"role": "user", "content": TURNS[2]}]
    _, cached, tier = _turn(_client(shared.procs["b"], "key-b"), probe, "moon")
    assert tier == "none" and cached < 32, (tier, cached)

    # The session moves to server b: its history comes from the shared tier, and the answer is a solo run's.
    msgs.append({"role": "user", "content": TURNS[2]})
    answer, cached, tier = _turn(b, msgs, "moon")
    assert tier == "remote" and cached > 0, (tier, cached)
    assert answer == _solo(shared, msgs)


def test_a_corrupted_chunk_is_never_imported(shared: Shared):
    msgs, keys = _new_session_on_a(shared, "corrupt")
    for key in keys:  # one bit flipped in each of this session's chunks
        blob = bytearray(shared.redis.get(key))
        blob[-10] ^= 0x01
        shared.redis.set(key, bytes(blob))
    b = shared.procs["b"]
    imports, refused = _count(b, "imports"), _count(b, "chunks_discarded_signature")
    _, cached, tier = _turn(_client(b, "key-b"), msgs, "corrupt")
    assert tier == "none" and cached < 32, (tier, cached)
    assert _count(b, "imports") == imports
    assert _count(b, "chunks_discarded_signature") == refused + 1


@pytest.mark.parametrize("forgery", ["unsigned", "signed with another key"])
def test_a_forged_chunk_with_valid_crcs_is_never_imported(shared: Shared, forgery: str):
    """Right store key, right session key and token ids, valid CRCs, other KV: refused for its signature."""
    session = f"victim-{forgery.split()[0]}"
    msgs, keys = _new_session_on_a(shared, session)
    stranger = ChunkSigner([b"k" * 32])
    for key in keys:
        sealed = shared.signer.open(key.decode(), shared.redis.get(key)).tobytes()
        forged = sealed[:CREATED] + _forge(sealed[CREATED:])
        shared.redis.set(key, forged if forgery == "unsigned" else stranger.seal(key.decode(), forged))
    b = shared.procs["b"]
    imports, refused = _count(b, "imports"), _count(b, "chunks_discarded_signature")
    answer, cached, tier = _turn(_client(b, "key-b"), msgs, session)
    assert tier == "none" and cached < 32, (tier, cached)
    assert _count(b, "imports") == imports and _count(b, "chunks_discarded_signature") == refused + 1
    assert answer == _solo(shared, msgs)


def test_malformed_and_oversized_values_cost_a_recomputation_not_memory(shared: Shared):
    b = shared.procs["b"]
    hwm = _vm_hwm_kib(b)
    # A correctly signed chunk whose header has fields of the wrong type (a buggy or compromised writer).
    msgs, keys = _new_session_on_a(shared, "malformed")
    for key in keys:
        sealed = shared.signer.open(key.decode(), shared.redis.get(key)).tobytes()
        malformed = sealed[:CREATED] + _forge(sealed[CREATED:], {"token_ids": "abc"})
        shared.redis.set(key, shared.signer.seal(key.decode(), malformed))
    refused = _count(b, "chunks_discarded_format")
    _, cached, tier = _turn(_client(b, "key-b"), msgs, "malformed")
    assert tier == "none" and cached < 32, (tier, cached)
    assert _count(b, "chunks_discarded_format") == refused + 1

    # A value larger than any chunk of this layout is refused before it is read.
    msgs, keys = _new_session_on_a(shared, "oversized")
    for key in keys:
        shared.redis.set(key, b"\0" * (64 << 20))
    refused = _count(b, "chunks_discarded_oversize")
    _, cached, tier = _turn(_client(b, "key-b"), msgs, "oversized")
    assert tier == "none" and cached < 32, (tier, cached)
    assert _count(b, "chunks_discarded_oversize") == refused + 1
    grown_mib = (_vm_hwm_kib(b) - hwm) / 1024
    assert grown_mib < 32, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_a_session_deleted_mid_turn_stays_deleted_on_every_server(shared: Shared):
    a, b = shared.procs["a"], shared.procs["b"]
    msgs, keys = _new_session_on_a(shared, "gone", tenant="key-a")
    answer, _, tier = _turn(_client(b), msgs, "gone")  # b now holds a copy too
    assert tier == "remote"
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": TURNS[2]}]

    # A long turn on a; the session is deleted while it streams.
    client = _client(a)
    stream = client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs, max_tokens=160,
                                            temperature=0, stream=True, extra_headers={"X-Session-ID": "gone"})
    deleted = threading.Event()
    pieces = []
    for chunk in stream:
        pieces.append(chunk)
        if len(pieces) == 4:
            r = httpx.delete(a.base_url + "/v1/sessions/gone", headers={"Authorization": "Bearer key-a"}, timeout=30)
            assert r.status_code == 200, r.text
            deleted.set()
    assert deleted.is_set() and len(pieces) > 8, "the turn ended before the deletion"
    _uploaded(a)
    _uploaded(b)

    # Nothing of it is left on a, nor in the shared tier, and b drops its own copy when next asked (a's
    # next turn starts the session afresh, which b does not take for the deleted one).
    assert httpx.get(a.base_url + "/v1/sessions/gone", headers={"Authorization": "Bearer key-a"},
                     timeout=30).status_code == 404
    assert not (shared.chunk_keys() & keys)
    applied = _count(b, "deletions_applied")
    for server in (a, b):
        _, cached, tier = _turn(_client(server), msgs, "gone")
        assert tier == "none" and cached < 32, (server.base_url, tier, cached)
        _uploaded(server)
    assert _count(b, "deletions_applied") == applied + 1


def test_a_shared_system_prompt_is_stored_once_and_reaches_new_sessions_on_other_servers(shared: Shared):
    """Two sessions on a behind one long system prompt put its whole chunks in the store once (c:DIGEST keys);
    a new session on b starts from them (imported, verified) and answers as a solo run; forged copies of
    them are refused for their signature."""
    system = " ".join(f"Policy {i}: reply about item {i} in one short sentence and cite clause {i * 5 % 23}."
                      for i in range(40))  # about 700 tokens: two whole 256-token chunks

    def first(i: int) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": TURNS[i]}]

    def content_keys() -> set[bytes]:
        return {k for k in shared.chunk_keys() if b":c:" in k}

    a, b = shared.procs["a"], shared.procs["b"]
    before = content_keys()
    _turn(_client(a), first(0), "sys-0")
    _uploaded(a)
    after_one = content_keys() - before
    assert len(after_one) >= 2
    _turn(_client(a), first(1), "sys-1")
    _uploaded(a)
    assert len(content_keys() - before - after_one) <= 1  # at most its own last chunk: the shared ones once

    # Tenant key-b's copies, forged (other KV, valid CRCs, unsigned): b refuses them and computes.
    before_b = content_keys()
    _turn(_client(a, "key-b"), first(0), "sys-b")
    _uploaded(a)
    for key in content_keys() - before_b:
        sealed = shared.signer.open(key.decode(), shared.redis.get(key)).tobytes()
        shared.redis.set(key, sealed[:CREATED] + _forge(sealed[CREATED:]))
    refused = _count(b, "chunks_discarded_signature")
    answer, cached, tier = _turn(_client(b, "key-b"), first(2), "sys-forged")
    assert tier == "none" and cached < 32 and answer == _solo(shared, first(2)), (tier, cached)
    assert _count(b, "chunks_discarded_signature") == refused + 1

    # Tenant key-a's, genuine: a new session on b starts from them.
    answer, cached, tier = _turn(_client(b), first(3), "sys-new")
    assert tier == "remote" and cached >= 512, (tier, cached)
    assert answer == _solo(shared, first(3))


def test_without_the_password_nothing_is_read_or_written(shared: Shared, tmp_path: Path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password")
    args = ("--kv-cache-gb", "0.1", "--remote-kv", shared.store.url, "--remote-kv-ca-file",
            str(shared.store.ca_file), "--remote-kv-signing-key-file", str(shared.store.signing_key_file))
    procs = {"wrong": ServerProcess(*args, "--ssd-dir", str(tmp_path / "w"), "--remote-kv-password-file", str(wrong),
                                    log=tmp_path / "wrong.log"),
             "none": ServerProcess(*args, "--ssd-dir", str(tmp_path / "n"), log=tmp_path / "none.log",
                                   env={"STRATA_REMOTE_KV_PASSWORD": ""})}
    msgs, _ = _new_session_on_a(shared, "locked-out", tenant="key-a")
    with started(procs):
        for srv in procs.values():
            before = shared.chunk_keys()
            answer, cached, tier = _turn(_client(srv), msgs, "locked-out")
            assert tier == "none" and cached < 32, (tier, cached)
            assert answer == _solo(shared, msgs)
            _uploaded(srv)
            assert shared.chunk_keys() == before
            assert _count(srv, "imports") == 0 and _count(srv, "uploads") == 0 and _count(srv, "errors") > 0


def test_redis_gone_mid_run_costs_recomputation_never_an_error(shared: Shared):
    """Last in this module: it stops the store."""
    a, b = shared.procs["a"], shared.procs["b"]
    msgs, _ = _new_session_on_a(shared, "outage", tenant="key-a")
    answer, _, _ = _turn(_client(b), msgs, "outage")
    shared.store.stop()
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": TURNS[2]}]
    answer, cached, _ = _turn(_client(b), msgs, "outage")  # what b holds still serves
    assert answer and cached > 0
    t0 = time.monotonic()
    _, _, tier = _turn(_client(a), [{"role": "user", "content": "Hello there."}], "new-session")
    # Answered in time without the store (the template's system prompt may come from a's shared chunks).
    assert tier in ("none", "dram") and time.monotonic() - t0 < 30
    for srv in (a, b):
        assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
