"""The server stays responsive and frees work nobody waits for: a free event loop, cancellation, timeouts."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import ServerProcess

STORY = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]


def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    """POST on a raw socket, so that the test can cut it at any moment (httpx cannot, from outside a read)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def _cut_after(port: int, path: str, body: dict, seconds: float, after_first: bool = False) -> tuple[bytes, float]:
    """Send, read whatever comes for `seconds` (counted from the first event with `after_first`), then close
    the connection. Returns what came and when the cut was."""
    s = _raw_post(port, path, body)
    s.settimeout(0.02)
    got = b""
    deadline = time.monotonic() + (30 if after_first else seconds)
    first_event = False
    try:
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += chunk
            # The response's headers usually come in a read of their own: look at everything so far.
            if after_first and not first_event and b"data: " in got:
                first_event = True
                deadline = time.monotonic() + seconds
    finally:
        s.close()
    return got, time.monotonic()


def _wait_idle(server: ServerProcess, within: float) -> dict[str, float]:
    names = ("strata_requests_running", "strata_requests_waiting", "strata_kv_blocks_used")
    deadline = time.monotonic() + within
    while True:
        values = {n: server.metric(n) for n in names}
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_cut_requests_are_aborted(server, model_name):
    """30 requests, half streaming, cut by the client at random moments: 2 s after the last cut nothing runs or
    waits and no blocks are held by requests."""
    rng = random.Random(1234)
    jobs = []
    for i in range(30):
        stream = i % 2 == 0
        body = {"model": model_name, "messages": STORY, "max_tokens": 2000, "ignore_eos": True, "stream": stream}
        if i % 3 == 0:  # cut at once: before the first token
            jobs.append((body, rng.uniform(0.0, 0.15), False))
        else:  # streams: a moment after their first token; the others while they run or queue
            jobs.append((body, rng.uniform(0.0, 1.5), True) if stream else (body, rng.uniform(1.0, 5.0), False))
    with ThreadPoolExecutor(len(jobs)) as pool:
        cuts = list(pool.map(lambda j: _cut_after(server.port, "/v1/chat/completions", *j), jobs))
    last_cut = max(t for _, t in cuts)
    streamed = [g for (body, _, _), (g, _) in zip(jobs, cuts, strict=True) if body["stream"]]
    assert any(b"data: " in g for g in streamed), "no stream was cut after its first token"
    assert any(not g for g in streamed), "no stream was cut before its first token"
    assert not any(g for (body, _, _), (g, _) in zip(jobs, cuts, strict=True) if not body["stream"])
    idle = _wait_idle(server, 2.0)
    assert time.monotonic() - last_cut < 2.5 and not any(idle.values()), idle
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_cut_completions_are_aborted(server, model_name):
    """The same for /v1/completions, streaming and not, cut while generating."""
    body = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    jobs = [(False, 1.0, False), (True, 0.5, True), (False, 0.05, False), (True, 0.05, False)]
    with ThreadPoolExecutor(4) as pool:
        cuts = list(pool.map(lambda j: _cut_after(server.port, "/v1/completions", body | {"stream": j[0]}, *j[1:]),
                             jobs))
    assert b"data: " in cuts[1][0]
    idle = _wait_idle(server, 2.0)
    assert not any(idle.values()), idle


@pytest.fixture(scope="module")
def timeout_server(tmp_path_factory, model_files):
    srv = ServerProcess("--kv-cache-gb", "0.1", "--request-timeout", "4",
                        log=tmp_path_factory.mktemp("timeout") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_request_timeout(timeout_server):
    base = timeout_server.base_url
    name = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    body = {"model": name, "messages": STORY, "max_tokens": 2000, "ignore_eos": True}
    for _ in range(2):  # the first one warms the model up (slow on a busy machine)
        short = httpx.post(base + "/v1/chat/completions", json=body | {"max_tokens": 2}, timeout=30)
    assert short.status_code == 200  # well within the limit

    t0 = time.monotonic()
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"] | {"message": ""} == {"message": "", "type": "server_error", "param": None,
                                                     "code": "request_timeout"}
    assert 3.9 < time.monotonic() - t0 < 10

    for path, b in [("/v1/chat/completions", body), ("/v1/completions", {"model": name, "prompt": "Once",
                                                                          "max_tokens": 2000, "ignore_eos": True})]:
        with httpx.stream("POST", base + path, json=b | {"stream": True}, timeout=30) as resp:
            assert resp.status_code == 200
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert len(events) > 3  # tokens came before the cut
    idle = _wait_idle(timeout_server, 2.0)
    assert not any(idle.values()), idle


@pytest.fixture(scope="module")
def small_body_server(tmp_path_factory, model_files):
    srv = ServerProcess("--kv-cache-gb", "0.1", "--max-body-bytes", str(4 * 2**20),
                        log=tmp_path_factory.mktemp("bigbody") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_event_loop_stays_free_under_a_huge_body(small_body_server):
    """While 4 MiB chat bodies are parsed and tokenized, /health answers fast and a stream keeps flowing."""
    srv = small_body_server
    name = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
    done = threading.Event()
    health: list[tuple[float, float]] = []  # (when, latency)
    tokens: list[float] = []

    def poll_health() -> None:
        with httpx.Client(timeout=10) as http:
            while not done.is_set():
                t = time.monotonic()
                assert http.get(srv.base_url + "/health").status_code == 200
                health.append((t, time.monotonic() - t))
                time.sleep(0.05)

    def stream() -> None:
        body = {"model": name, "messages": STORY, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", srv.base_url + "/v1/chat/completions",
                                                           json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    tokens.append(time.monotonic())
                if done.is_set():
                    return

    content = "word " * ((4 * 2**20 - 200) // 5)
    with ThreadPoolExecutor(2) as pool:
        side = [pool.submit(poll_health), pool.submit(stream)]
        while len(tokens) < 3:
            time.sleep(0.05)
        start = time.monotonic()
        for _ in range(2):
            r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=120, json={
                "model": name, "messages": [{"role": "user", "content": content}], "max_tokens": 4})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        end = time.monotonic()
        done.set()
        for f in side:
            f.result()
    assert end - start > 1.0  # the big bodies took real work: the test measured something
    during = [lat for t, lat in health if start <= t <= end]
    assert len(during) >= (end - start) / 0.6 and max(during) < 0.5, max(during)
    arrivals = [t for t in tokens if start <= t <= end]
    gaps = [b - a for a, b in zip([start, *arrivals], [*arrivals, end], strict=True)]
    # Tokenizing one such body takes ~3 s: on the event loop, that would be one gap at least that long.
    # (A decode step itself can take ~1 s when the machine is busy.)
    assert len(arrivals) >= 5 and max(gaps) < 2.0, (len(arrivals), max(gaps))
