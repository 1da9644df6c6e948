"""Faults and a soak against real strata servers: what each fault does, and whether long mixed traffic leaks.

Part 1 (faults): each fault is tried against a running server (fresh ones where a fault is injected into the
engine with STRATA_INJECT_FAULT, see strata/engine/faults.py) and what happened is written down, one row each.
Part 2 (soak): --minutes of mixed traffic from several clients at once: multi-turn sessions (histories come
back from HBM, DRAM and SSD: the pools are small), anonymous requests streamed or not, streams cut at random
moments, and bad input. Every 10 s the server's RSS, its KV blocks held by requests and the requests running
are sampled; every status is counted (no 5xx is allowed).

Writes both tables into docs/reliability.md (between its markers) and docs/reliability.png.

    python benchmarks/soak.py                 # faults, then a 20-minute soak
    python benchmarks/soak.py --minutes 2     # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from machine import cpu_name  # benchmarks/ is on sys.path when run as a script
from server_process import REPO, Server

DOC = REPO / "docs" / "reliability.md"
PLOT = DOC.with_suffix(".png")
MODEL = "SmolLM2-135M-Instruct"
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
TOPICS = ["the moon", "volcanoes", "honey bees", "glaciers", "octopuses", "jazz", "comets", "bridges", "tea"]
BAD_BODIES = [
    {"temperature": float("nan")}, {"logit_bias": {str(i): 1 for i in range(301)}}, {"stop": ["x" * 513]},
    {"messages": [{"role": "user", "content": "a\ud800b"}]}, {"n": 1000}, {"max_tokens": -1},
    {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": [{"role": "user", "content": "w " * 5000}]},
]


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def body(messages: list[dict], **kw: object) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 32, "temperature": 0} | kw


def post(url: str, data: dict, headers: dict | None = None, timeout: float = 300) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=json.dumps(data), timeout=timeout,
                      headers={"Content-Type": "application/json", **(headers or {})})


def stream(url: str, data: dict) -> tuple[str, str | None]:
    """(text, message of a final error event or None)."""
    text, error = "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=data | {"stream": True}, timeout=300) as r:
        if r.status_code != 200:
            return "", f"HTTP {r.status_code}"
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                text += event["choices"][0]["delta"]["content"]
    return text, error


def cut(port: int, data: dict, after: float) -> None:
    """A client that sends a request and goes away `after` seconds later (a raw socket: no clean close)."""
    raw = json.dumps(data).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    time.sleep(after)
    s.close()


def metric(server: Server, name: str) -> float:
    return server.metrics().get(name, float("nan"))


def wait_idle(server: Server, within: float) -> float | None:
    """Seconds until nothing runs, waits or holds blocks (None: not within `within`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        m = server.metrics()
        if not (m["strata_requests_running"] or m["strata_requests_waiting"] or m["strata_kv_blocks_used"]):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


# ---------------------------------------------------------------- part 1: faults


@dataclass
class Row:
    fault: str
    expected: str
    observed: str
    ok: bool


def fault_rows(tmp: Path) -> list[Row]:
    rows: list[Row] = []

    def add(fault: str, expected: str, observed: str, ok: bool) -> None:
        log(f"{'ok ' if ok else 'BAD'} {fault}: {observed}")
        rows.append(Row(fault, expected, observed, ok))

    ssd = tmp / "faults-ssd"
    main = Server(["--max-model-len", "1024", "--ssd-dir", str(ssd), "--max-body-bytes", str(4 << 20)],
                  env={"STRATA_INJECT_FAULT": "sample-seed=666"}, log=tmp / "faults.log")
    try:
        url = main.url
        solo, _ = stream(url, body(STORY, max_tokens=64, ignore_eos=True))

        with ThreadPoolExecutor(2) as pool:
            victim = pool.submit(stream, url, body(STORY, max_tokens=64, ignore_eos=True))
            bad = pool.submit(post, url, body(STORY, temperature=1e-45))
            same, status = victim.result()[0] == solo, bad.result().status_code
        add("temperature 1e-45 while another stream runs", "200 (greedy); the other stream unchanged",
            f"{status}; other stream {'identical to its solo run' if same else 'DIFFERENT'}", status == 200 and same)

        for name, extra in (("temperature NaN", {"temperature": float("nan")}),
                            ("301 logit_bias entries", {"logit_bias": {str(i): 1 for i in range(301)}}),
                            ("a stop string of 513 characters", {"stop": ["x" * 513]}),
                            ("a lone surrogate (invalid Unicode) in a message",
                             {"messages": [{"role": "user", "content": "a\ud800b"}]}),
                            ("a prompt longer than the context", {"messages": [{"role": "user",
                                                                                 "content": "w " * 3000}]})):
            r = post(url, body(STORY) | extra)
            param = r.json().get("error", {}).get("param") if r.status_code != 200 else None
            add(name, "400 with the OpenAI error body", f"{r.status_code} (param {param})", r.status_code == 400)

        latencies: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                httpx.get(url + "/health", timeout=30)
                latencies.append(time.monotonic() - t0)
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        big = post(url, body([{"role": "user", "content": "word " * ((4 << 20) // 5 - 100)}]))
        done.set()
        poller.join()
        add("a 4 MiB body", "400 context_length_exceeded; /health keeps answering",
            f"{big.status_code}; slowest /health {max(latencies) * 1000:.0f} ms over {len(latencies)} polls",
            big.status_code == 400 and max(latencies) < 0.5)

        rng = random.Random(3)
        with ThreadPoolExecutor(30) as pool:
            list(pool.map(lambda i: cut(main.port, body(STORY, max_tokens=2000, ignore_eos=True, stream=i % 2 == 0),
                                        rng.uniform(0.0, 3.0)), range(30)))
        idle = wait_idle(main, 10)
        add("30 clients that go away (streaming or not, before or after the first token)",
            "aborted: nothing running or holding blocks within 2 s of the last cut",
            f"idle {idle:.2f} s after the last cut" if idle is not None else "still busy after 10 s",
            idle is not None and idle < 2.0)

        with ThreadPoolExecutor(2) as pool:
            victim = pool.submit(stream, url, body(STORY, max_tokens=64, ignore_eos=True))
            bad = pool.submit(stream, url, body(STORY, max_tokens=64, seed=666))
            same, (_, error) = victim.result()[0] == solo, bad.result()
        add("sampling raises for one request (injected)", "that request ends with server_error; the other "
            "unchanged", f"error event: {error!r}; other stream {'identical' if same else 'DIFFERENT'}",
            error is not None and same)

        session = {"X-Session-ID": "durable"}
        msgs = [{"role": "user", "content": "Tell me about the moon."}]
        first = post(url, body(msgs), session).json()["choices"][0]["message"]["content"]
        msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "How far away is it?"}]
        post(url, body(msgs), session)
        time.sleep(0.5)
        main.proc.kill()  # kill -9 while the session's KV is being written back
        main.proc.wait()
    finally:
        main.stop()
    again = Server(["--max-model-len", "1024", "--ssd-dir", str(ssd)], log=tmp / "faults-restart.log")
    try:
        r = post(again.url, body(msgs + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "Why?"}]),
                 session)
        tier, cached = r.headers.get("X-Cache-Tier"), r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        corrupt = metric(again, "strata_kv_corrupt_chunks_discarded_total")
        add("kill -9 during saves, then a restart on the same SSD tier", "the session is served from SSD; "
            "a torn chunk is discarded, never served", f"{r.status_code}, tier {tier}, {cached} cached tokens, "
            f"{corrupt:.0f} chunks discarded", r.status_code == 200 and tier == "ssd" and cached > 0)
    finally:
        again.stop()

    step = Server(["--max-model-len", "1024", "--request-timeout", "3"], env={"STRATA_INJECT_FAULT": "step=3"},
                  log=tmp / "faults-step.log")
    try:
        _, error = stream(step.url, body(STORY, max_tokens=16))
        after = post(step.url, body(STORY, max_tokens=16)).status_code
        blocks = metric(step, "strata_kv_blocks_used")
        add("a forward pass raises (injected, step 3)", "its batch ends with server_error, blocks freed, "
            "the engine goes on", f"error event {error!r}; next request {after}; {blocks:.0f} blocks held",
            error is not None and after == 200 and blocks == 0)
        t0 = time.monotonic()
        r = post(step.url, body(STORY, max_tokens=900, ignore_eos=True))
        add("a request running past --request-timeout 3", "504 request_timeout, its blocks freed",
            f"{r.status_code} {r.json()['error']['code']} after {time.monotonic() - t0:.1f} s",
            r.status_code == 504)
    finally:
        step.stop()

    death = Server(["--max-model-len", "1024"], env={"STRATA_INJECT_FAULT": "engine-death=40"},
                   log=tmp / "faults-death.log")
    try:
        with ThreadPoolExecutor(4) as pool:
            ended = list(pool.map(lambda _: stream(death.url, body(STORY, max_tokens=500, ignore_eos=True)),
                                  range(4)))
        t_end = time.monotonic()
        while httpx.get(death.url + "/health").status_code != 503 and time.monotonic() - t_end < 10:
            time.sleep(0.02)
        seen = time.monotonic() - t_end
        health = httpx.get(death.url + "/health").json()
        new = post(death.url, body(STORY)).status_code
        errors = sum(e is not None for _, e in ended)
        add("the engine thread dies (injected, step 40)", "every open request ends with an error, /health 503 "
            "with the reason within 1 s, new requests 503", f"{errors}/4 streams ended with an error; /health 503 "
            f"after {seen:.2f} s ({health.get('reason')!r}); new request {new}",
            errors == 4 and seen < 1.0 and new == 503)
    finally:
        death.stop()
    return rows


# ---------------------------------------------------------------- part 2: soak


@dataclass
class Soak:
    statuses: Counter[str] = field(default_factory=Counter)  # "kind status"
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)  # (s, RSS MiB, blocks, running)
    problems: list[str] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(tmp: Path, minutes: float) -> tuple[Soak, Server]:
    server = Server(["--kv-cache-gb", "0.1", "--dram-kv-gb", "0.05", "--ssd-dir", str(tmp / "soak-ssd"),
                     "--ssd-kv-gb", "0.5", "--max-model-len", "2048"], log=tmp / "soak.log")
    result = Soak()
    stop = time.monotonic() + minutes * 60
    lock = threading.Lock()

    def count(kind: str, status: int | str) -> None:
        with lock:
            result.statuses[f"{kind} {status}"] += 1

    def sessions(worker: int) -> None:
        rng = random.Random(worker)
        while time.monotonic() < stop:
            key = f"w{worker}-{rng.randrange(10**9)}"
            msgs: list[dict] = []
            for turn in range(rng.randrange(2, 7)):
                msgs.append({"role": "user", "content": f"Tell me more about {rng.choice(TOPICS)} ({turn})."})
                r = post(server.url, body(msgs), {"X-Session-ID": key})
                count("session", r.status_code)
                if r.status_code != 200:
                    break
                msgs.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})

    def anonymous() -> None:
        rng = random.Random(100)
        while time.monotonic() < stop:
            data = body([{"role": "user", "content": f"Say something about {rng.choice(TOPICS)}."}],
                        temperature=rng.choice([0, 0.7, 1.5]), n=rng.choice([1, 2]))
            if rng.random() < 0.5:
                _, error = stream(server.url, data)
                count("stream", "error" if error else 200)
            else:
                count("plain", post(server.url, data).status_code)

    def disconnects() -> None:
        rng = random.Random(200)
        while time.monotonic() < stop:
            cut(server.port, body(STORY, max_tokens=500, stream=rng.random() < 0.5), rng.uniform(0, 2))
            count("cut", "sent")
            time.sleep(rng.uniform(0, 2))

    def bad_input() -> None:
        rng = random.Random(300)
        while time.monotonic() < stop:
            count("bad", post(server.url, body(STORY) | rng.choice(BAD_BODIES)).status_code)
            time.sleep(rng.uniform(0.5, 2))

    def sampler() -> None:
        t0 = time.monotonic()
        while time.monotonic() < stop:
            m = server.metrics()
            result.samples.append((time.monotonic() - t0, rss_mib(server.proc.pid), m["strata_kv_blocks_used"],
                                   m["strata_requests_running"]))
            log(f"{result.samples[-1][0]:.0f} s: RSS {result.samples[-1][1]:.0f} MiB, blocks used "
                f"{result.samples[-1][2]:.0f}, running {result.samples[-1][3]:.0f}; {dict(result.statuses)}")
            time.sleep(10)

    jobs = [lambda w=w: sessions(w) for w in range(3)] + [anonymous, disconnects, bad_input, sampler]

    def guard(job: object) -> None:
        try:
            job()  # type: ignore[operator]
        except Exception as e:  # a transport error is a finding, not a crash of the benchmark
            result.problems.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=guard, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result, server


# ---------------------------------------------------------------- report


def fault_table(rows: list[Row]) -> str:
    lines = ["| fault | expected | what happened | |", "|---|---|---|---|"]
    lines += [f"| {r.fault} | {r.expected} | {r.observed} | {'ok' if r.ok else '**not met**'} |" for r in rows]
    return "\n".join(lines)


def soak_table(s: Soak, minutes: float, idle_after: float | None) -> str:
    warm = [x for x in s.samples if x[0] >= 120] or s.samples
    rss = [x[1] for x in warm]
    quarter = max(1, len(warm) // 4)
    blocks_first = statistics.median(x[2] for x in warm[:quarter])
    blocks_last = statistics.median(x[2] for x in warm[-quarter:])
    fivexx = sum(n for k, n in s.statuses.items() if re.search(r" 5\d\d$", k))
    errors = sum(n for k, n in s.statuses.items() if k.endswith(" error"))
    total = sum(n for k, n in s.statuses.items())
    rows = [
        ("duration", f"{minutes:g} min, {len(s.samples)} samples"),
        ("requests", f"{total} ({', '.join(f'{k}: {n}' for k, n in sorted(s.statuses.items()))})"),
        ("5xx answers / stream error events", f"{fivexx} / {errors}"),
        ("client transport errors", str(len(s.problems))),
        ("RSS after warm-up (2 min) / at the end / max", f"{rss[0]:.0f} / {rss[-1]:.0f} / {max(rss):.0f} MiB"),
        ("KV blocks held by requests, median of first / last quarter", f"{blocks_first:.0f} / {blocks_last:.0f}"),
        ("seconds until nothing runs or holds blocks after the traffic stopped",
         f"{idle_after:.2f}" if idle_after is not None else "not within 30 s"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def plot(s: Soak) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [x[0] / 60 for x in s.samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, [x[1] for x in s.samples], label="RSS (MiB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax2 = ax.twinx()
    ax2.plot(t, [x[2] for x in s.samples], color="tab:orange", label="KV blocks held by requests")
    ax2.set_ylabel("blocks")
    fig.legend(loc="upper right")
    ax.set_title("soak: server memory and KV blocks under mixed traffic")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)
    return True


def replace_between(text: str, name: str, content: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    i, j = text.index(begin) + len(begin), text.index(end)
    return text[:i] + "\n" + content + "\n" + text[j:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the soak")
    parser.add_argument("--no-faults", action="store_true", help="skip part 1 (the fault table is left as it is)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = [] if args.no_faults else fault_rows(tmp)
        log(f"soak for {args.minutes:g} minutes")
        result, server = soak(tmp, args.minutes)
        try:
            idle_after = wait_idle(server, 30)
        finally:
            server.stop()
    stamp = f"{datetime.date.today()}, {cpu_name()}, `python benchmarks/soak.py --minutes {args.minutes:g}`"
    text = DOC.read_text()
    if rows:
        text = replace_between(text, "faults", f"Run: {stamp}.\n\n{fault_table(rows)}")
    drawn = plot(result)
    text = replace_between(text, "soak", f"Run: {stamp}.\n\n{soak_table(result, args.minutes, idle_after)}"
                           + ("\n\n![RSS and KV blocks during the soak](reliability.png)" if drawn else ""))
    DOC.write_text(text)
    log(f"wrote {DOC.relative_to(REPO)}" + (f" and {PLOT.relative_to(REPO)}" if drawn else ""))
    if result.problems:
        log(f"client problems: {result.problems[:5]}")


if __name__ == "__main__":
    main()
