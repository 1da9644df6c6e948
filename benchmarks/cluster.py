"""Scale-out on one machine: what session affinity buys, and what a killed server costs.

Run: `make bench-cluster` or `python benchmarks/cluster.py [--instances 3] [--sessions 12] [--turns 4]`.

N strata servers (small device pools, their own SSD tiers) behind the real HAProxy router of deploy/ (`make
cluster`'s setup). S chat sessions of T turns (a 300-400 token document passage, then short questions;
greedy answers of at most 24 tokens; the sessions run concurrently, each sending its next turn when the
last one ended) go through the router in four runs, each against fresh servers:

* affinity: every request carries X-Session-ID, hashed consistently to one server;
* no affinity: the session goes as `prompt_cache_key` in the body, which the router cannot see: each turn lands
  on any server, and reuses the session's KV only where it lands on the server that served the last turn;
* kill: affinity, and one server is killed (-9) after every session's second turn and not restarted; its
  sessions' later turns go to the others;
* kill, with the shared tier: the same with `--remote-kv` (a redis-server on loopback): the others import
  the killed server's sessions from it instead of recomputing them.

Per run: the hit rate of turns 2+ (cached_tokens above half the prompt), their median TTFT (client-side,
streamed), and the same for the sessions whose server was killed. Writes the section
"## Measured (make bench-cluster)" of docs/deploy.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from doc_section import write_heading_section  # benchmarks/ is on sys.path when run as a script
from machine import cpu_name
from multiturn import conversations
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy"))
from cluster import Cluster, RedisServer  # noqa: E402

DOC = REPO / "docs" / "deploy.md"
SECTION = "## Measured (make bench-cluster)"


@dataclass
class Turn:
    session: int
    turn: int
    ttft: float
    cached: int
    prompt: int
    upstream: str


@dataclass
class RunResult:
    name: str
    turns: list[Turn] = field(default_factory=list)
    victims: set[int] = field(default_factory=set)
    seconds: float = 0.0


def log(msg: str) -> None:
    print(f"[bench-cluster] {msg}", flush=True)


def one_turn(client: OpenAI, model: str, session: int, messages: list[dict], affinity: bool) -> tuple[str, Turn]:
    key = f"bench-session-{session}"
    extra = {"extra_headers": {"X-Session-ID": key}} if affinity else {"extra_body": {"prompt_cache_key": key}}
    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, **extra)
    ttft, parts, cached, prompt = None, [], 0, 0
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
            prompt = chunk.usage.prompt_tokens
    upstream = raw.headers.get("x-strata-upstream", "")
    return "".join(parts), Turn(session, len(messages) // 2, ttft or time.perf_counter() - t0, cached, prompt,
                                upstream)


def run(name: str, args: argparse.Namespace, texts: list[list[str]], workdir: Path, kill: bool,
        shared: bool) -> RunResult:
    store = RedisServer(workdir / f"{name.replace(' ', '-')}-redis") if shared else None
    flags = ["--kv-cache-gb", str(args.kv_cache_gb), "--dtype", args.dtype]
    cluster = Cluster(workdir / name.replace(" ", "-"), flags + (store.strata_args() if store else []),
                      upstream_header=True)
    result = RunResult(name)
    try:
        log(f"{name}: starting {args.instances} servers and the router")
        cluster.add(args.instances)
        client = OpenAI(base_url=cluster.router_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        affinity = name != "no affinity"
        second_turn_done = threading.Barrier(len(texts) + 1) if kill else None
        lock = threading.Lock()

        errors: list[BaseException] = []

        def session(s: int) -> None:
            try:
                talk(s)
            except BaseException as e:  # a failed turn fails the run, after the other sessions end
                errors.append(e)
                if second_turn_done is not None:
                    second_turn_done.abort()

        def talk(s: int) -> None:
            messages: list[dict] = []
            for t, text in enumerate(texts[s]):
                messages.append({"role": "user", "content": text})
                answer, turn = one_turn(client, model, s, messages, affinity)
                messages.append({"role": "assistant", "content": answer})
                with lock:
                    result.turns.append(turn)
                if second_turn_done is not None and t == 1:
                    second_turn_done.wait()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=session, args=(s,)) for s in range(len(texts))]
        for th in threads:
            th.start()
        if second_turn_done is not None:
            second_turn_done.wait()
            dead = cluster.instances[0]
            dead_addr = f"127.0.0.1:{dead.port}"
            with lock:
                result.victims = {tr.session for tr in result.turns if tr.upstream == dead_addr}
            log(f"{name}: killing {dead.name} (-9), which served {len(result.victims)} sessions")
            cluster.kill(dead)
        for th in threads:
            th.join()
        if errors:
            raise RuntimeError(f"{name}: {len(errors)} sessions failed") from errors[0]
        result.seconds = time.perf_counter() - t0
        log(f"{name}: {len(result.turns)} turns in {result.seconds:.0f} s")
    finally:
        cluster.stop()
        if store is not None:
            store.stop()
    return result


def summarize(turns: list[Turn]) -> tuple[str, str]:
    later = [t for t in turns if t.turn >= 1]
    if not later:
        return "-", "-"
    # Reused: more than half of the prompt came from stored KV (every turn shares the chat template's
    # system prompt with other sessions: a few cached tokens are not the session's history).
    hits = sum(t.cached > t.prompt / 2 for t in later)
    median_ms = statistics.median(t.ttft for t in later) * 1000
    return f"{hits}/{len(later)} ({100 * hits / len(later):.0f}%)", f"{median_ms:.0f} ms"


def write_doc(results: list[RunResult], args: argparse.Namespace, argv: list[str]) -> None:
    lines = [SECTION, "",
             "| run | turns 2+ that reused KV | median TTFT, turns 2+ | whole run |", "|---|---:|---:|---:|"]
    for r in results:
        hit, ttft = summarize(r.turns)
        lines.append(f"| {r.name} | {hit} | {ttft} | {r.seconds:.0f} s |")
        if r.victims:
            after = [t for t in r.turns if t.session in r.victims and t.turn >= 2]
            hit, ttft = summarize(after)
            lines.append(f"| {r.name}: the killed server's sessions, turns 3+ | {hit} | {ttft} | |")
    command = " ".join(["python benchmarks/cluster.py", *argv])
    lines += ["", f"Command: `{command}` (`make bench-cluster`), "
              f"run {datetime.date.today().isoformat()} on {cpu_name()} ({args.instances} servers and HAProxy on one "
              f"machine; {args.sessions} sessions x {args.turns} turns, concurrent; --dtype {args.dtype}, "
              f"--kv-cache-gb {args.kv_cache_gb} per server).",
              "Without affinity a turn reuses its session's KV only when it lands where the last one was "
              "served. After a kill without a shared tier, the killed server's sessions recompute their whole "
              "history once on the server the ring gives them next, then hit there; with the shared tier "
              "(`--remote-kv`, a local redis-server) that next server imports their KV instead.", ""]
    write_heading_section(DOC, SECTION, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    texts = conversations(args.sessions, args.turns, (300, 400), (20, 60))
    results = []
    with tempfile.TemporaryDirectory(prefix="strata-bench-cluster-") as tmp:
        for name, kill, shared in (("affinity", False, False), ("no affinity", False, False),
                                   ("kill", True, False), ("kill, with the shared tier", True, True)):
            results.append(run(name, args, texts, Path(tmp), kill, shared))
    for r in results:
        log(f"{r.name}: turns 2+ reused KV {summarize(r.turns)[0]}, median TTFT {summarize(r.turns)[1]}")
    write_doc(results, args, shown)
    log(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
