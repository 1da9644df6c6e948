"""One request never harms another: extreme input, failures injected into sampling, a forward pass or the
engine thread itself. Real servers, the victims compared with their solo runs."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from tests.conftest import ServerProcess, started

MODEL = "SmolLM2-135M-Instruct"

MAX_LEN = 1024
VICTIM = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def victim_text(base_url: str, max_tokens: int = 64, seed: int | None = None) -> str:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    text = ""
    stream = client.chat.completions.create(model=MODEL, messages=VICTIM, max_tokens=max_tokens, temperature=0,
                                            stream=True, seed=seed, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text


def junk(rng: random.Random, n: int) -> str:
    """Random code points from every plane, lone surrogates and control characters included."""
    picks = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.1:
            picks.append(chr(rng.randrange(0xD800, 0xE000)))
        elif kind < 0.2:
            picks.append(chr(rng.randrange(0, 32)))
        else:
            picks.append(chr(rng.randrange(0x20, 0x110000)))
    return "".join(c for c in picks)


def fuzz_body(rng: random.Random) -> dict:
    """One request with extreme and random parameters (many valid, some not)."""
    content = rng.choice([
        "Hello!", "", junk(rng, 40), "word " * (MAX_LEN - 30), "word " * rng.randrange(1, 400),
        "\u200b" * 50, "🙂" * 100,
    ])
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": content}],
                  "max_tokens": rng.choice([1, 2, 4, 8])}
    options = {
        "temperature": lambda: rng.choice([1e-45, 1e-20, 1e-6, 1e-5, 0.3, 1.0, 2.0, 0]),
        "top_p": lambda: rng.choice([1e-9, 0.01, 0.5, 1.0]),
        "top_k": lambda: rng.choice([1, 2, 10**9, 0, -1]),
        "min_p": lambda: rng.choice([0.0, 0.5, 1.0]),
        "logit_bias": lambda: {str(rng.randrange(49152)): rng.choice([-100, 100]) for _ in range(300)},
        "presence_penalty": lambda: rng.choice([-2.0, 2.0]),
        "frequency_penalty": lambda: rng.choice([-2.0, 2.0]),
        "repetition_penalty": lambda: rng.choice([0.01, 10.0, 1.0]),
        "n": lambda: rng.choice([1, 16]),
        "logprobs": lambda: True,
        "top_logprobs": lambda: 20,
        "stop": lambda: [junk(rng, 500)[:rng.randrange(1, 500)] or "x" for _ in range(16)],
        "seed": lambda: rng.choice([0, -1, 2**63 - 1, rng.randrange(10**6)]),
        "min_tokens": lambda: rng.choice([0, 4, 1000]),
        "stream": lambda: rng.random() < 0.5,
        "ignore_eos": lambda: True,
        "stop_token_ids": lambda: [rng.randrange(49152) for _ in range(5)],
        "max_tokens": lambda: rng.choice([1, 3, 10**6, MAX_LEN]),
    }
    for name in rng.sample(sorted(options), rng.randrange(1, 8)):
        body[name] = options[name]()
    if body.get("top_logprobs") and not body.get("logprobs"):
        body["logprobs"] = True
    if body.get("n", 1) > 1:
        body["max_tokens"] = min(body["max_tokens"], 4)
    if rng.random() < 0.05:
        body["temperature"] = float("nan")  # sent as NaN, which Python's json writes and reads
    return body


def send(http: httpx.Client, body: dict, problems: list[str]) -> int:
    """The status of one fuzz request; a broken stream or connection is a problem (status -1)."""
    data = json.dumps(body)
    headers = {"Content-Type": "application/json"}
    try:
        if body.get("stream"):
            with http.stream("POST", "/v1/chat/completions", content=data, headers=headers) as r:
                text = "".join(r.iter_text())
                if r.status_code == 200 and (not text.rstrip().endswith("data: [DONE]") or "server_error" in text):
                    problems.append(f"stream {data[:200]} ended with {text[-300:]}")
                return r.status_code
        return http.post("/v1/chat/completions", content=data, headers=headers).status_code
    except httpx.HTTPError as e:
        problems.append(f"{type(e).__name__} {e} for {data[:300]}")
        return -1


@pytest.fixture(scope="module")
def chaos_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("chaos") / "server.log"
    with started({"s": ServerProcess("--max-model-len", str(MAX_LEN), "--kv-cache-gb", "0.3", log=log)}) as procs:
        yield procs["s"]


@pytest.mark.slow
def test_chaos_never_reaches_the_victim(chaos_server):
    """A greedy stream of 64 tokens runs while 200 requests with extreme parameters hit the server:
    the stream equals its solo run, every fuzz request gets 200 or a 4xx, and the server stays healthy."""
    base = chaos_server.base_url
    solo = victim_text(base)
    rng = random.Random(1234)
    bodies = [fuzz_body(rng) for _ in range(200)]
    statuses: list[int] = []
    problems: list[str] = []
    done = threading.Event()

    def fuzz() -> None:
        with httpx.Client(base_url=base, timeout=300) as http, ThreadPoolExecutor(6) as pool:
            statuses.extend(pool.map(lambda b: send(http, b, problems), bodies))
        done.set()

    fuzzer = threading.Thread(target=fuzz)
    fuzzer.start()
    time.sleep(1.0)  # the fuzz is running when the victim starts
    during = victim_text(base)
    fuzzer.join(600)
    assert done.is_set()
    assert during == solo
    assert not problems, problems[:5]
    bad = [s for s in statuses if not (s == 200 or 400 <= s < 500)]
    assert not bad, f"fuzz statuses {sorted(set(statuses))}: {chaos_server.log_tail()}"
    assert statuses.count(200) > 50  # most were valid: the fuzz really ran the engine
    assert httpx.get(base + "/health").status_code == 200
    assert chaos_server.metric("strata_requests_running") == 0


def stream_until_end(base: str, body: dict) -> tuple[str, str | None]:
    """(text received, error message of the stream's final error event or None)."""
    text, error = "", None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                text += event["choices"][0]["delta"]["content"]
    return text, error


def test_a_failing_request_ends_alone(tmp_path):
    """Sampling raises for one request (injected); the request next to it goes on, token for token the same."""
    procs = {"s": ServerProcess(env={"STRATA_INJECT_FAULT": "sample-seed=666"}, log=tmp_path / "s.log")}
    with started(procs):
        base = procs["s"].base_url
        solo = victim_text(base, seed=1)
        bad_body = {"model": MODEL, "messages": VICTIM, "max_tokens": 64, "stream": True, "seed": 666}
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(stream_until_end, base, bad_body)
            good = pool.submit(victim_text, base, 64, 1)
            assert good.result() == solo
            _, error = bad.result()
        assert error is not None and "internal error" in error
        r = httpx.post(base + "/v1/chat/completions", json=bad_body | {"stream": False}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert httpx.get(base + "/health").json()["status"] == "ok"


def running_and_waiting(srv: ServerProcess) -> tuple[float, float]:
    """Both gauges from one scrape: one engine snapshot."""
    values = dict(line.split(" ") for line in httpx.get(srv.base_url + "/metrics", timeout=5).text.splitlines()
                  if line.startswith(("strata_requests_running ", "strata_requests_waiting ")))
    return float(values["strata_requests_running"]), float(values["strata_requests_waiting"])


def test_a_failed_forward_pass_ends_only_its_batch(tmp_path):
    """Step 200 raises (injected) while one request runs and its neighbour waits outside the batch
    (--max-num-seqs 1): the running one ends with an error; the neighbour is then served, token for token
    as alone, and no blocks stay held."""
    procs = {"s": ServerProcess("--max-num-seqs", "1", env={"STRATA_INJECT_FAULT": "step=200"},
                                log=tmp_path / "s.log")}
    with started(procs):
        srv = procs["s"]
        solo = victim_text(srv.base_url, max_tokens=32)  # steps 1 to 32
        # Runs until the failed step: ignore_eos and more tokens than steps are left.
        failing = {"model": MODEL, "messages": [{"role": "user", "content": "Count to a thousand."}],
                   "max_tokens": 400, "ignore_eos": True, "stream": True}
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(stream_until_end, srv.base_url, failing)
            while srv.metric("strata_requests_running") == 0:
                assert not bad.done(), bad.result()
                time.sleep(0.02)
            neighbour = pool.submit(victim_text, srv.base_url, 32)
            # One scrape (taken on the engine thread) shows the neighbour queued while the failing request
            # still runs, so it was in the engine, outside the batch, when that batch failed.
            while running_and_waiting(srv) != (1, 1):
                assert not bad.done(), "the failing request ended before its neighbour was queued"
                time.sleep(0.02)
            _, error = bad.result()
            assert error is not None and "injected" in error
            assert neighbour.result() == solo
        assert httpx.get(srv.base_url + "/health").status_code == 200
        assert srv.metric("strata_kv_blocks_used") == 0


def test_engine_death_is_seen_at_once(tmp_path):
    """The engine thread dies (injected) with requests in flight: each ends with an error, /health says 503
    within a second, and new requests get 503."""
    procs = {"s": ServerProcess(env={"STRATA_INJECT_FAULT": "engine-death=40"}, log=tmp_path / "s.log")}
    with started(procs):
        base = procs["s"].base_url
        body = {"model": MODEL, "messages": VICTIM, "max_tokens": 500, "stream": True, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: stream_until_end(base, body), range(4)))
        ended = time.monotonic()
        assert all(error is not None for _, error in results), results
        while httpx.get(base + "/health").status_code != 503:
            assert time.monotonic() - ended < 1.0
            time.sleep(0.05)
        health = httpx.get(base + "/health").json()
        assert "injected engine death" in health["reason"]
        r = httpx.post(base + "/v1/chat/completions", json=body | {"stream": False}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert procs["s"].metric("strata_engine_ready") == 0
