"""Routing on a skewed multi-turn replay: bounded-load consistent hashing against plain consistent hashing
and round robin, one after the other, each against fresh servers.

Run: `make bench-routing` or `python benchmarks/routing.py`.

3 strata servers on loopback (each one compute thread and at most 2 running sequences, so a server has a
fixed capacity as a GPU pod has; small device pools; their own SSD tiers; one shared redis tier) behind the
real HAProxy router of deploy/ with `--balance bounded`, `consistent` or `roundrobin`
(deploy/router_config.py). The replay, seeded, the same in each run:

* busy: 4 long sessions (a 500-700 token document, then 7 questions) with short think times (1 s);
* short: 6 sessions of 3 turns (a 300-400 token document, then questions), think 6 s;
* shared: 3 sessions behind one long system prompt (~600 tokens) with short questions, 3 turns, think 6 s;
* chains: 3 Responses chains of 3 calls linked by previous_response_id, without any session header.

Sessions start at seeded times within the first 10 s; answers are greedy, at most 16 tokens, streamed. The
load keeps the two cores of the machine below saturation, so that a server's own capacity (one thread, two
sequences) is what a skewed placement runs into.

Each balancing runs --repeats times (2), the balancings taking turns. Per balancing: the whole replay's wall
time (each run), p50/p99 TTFT of turns 2+ (client-side, first content token; pooled over the runs), the share
of turns 2+ that reused KV and from which tier (X-Cache-Tier), requests per server (each run) and the
router's decisions (its /router/metrics, summed). Writes the section "## Measured (make bench-routing)" of
docs/deploy.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import multiturn  # benchmarks/ is on sys.path when run as a script
from doc_section import write_heading_section
from machine import cpu_name
from multiturn import conversations
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy"))
from cluster import Cluster, RedisServer  # noqa: E402

DOC = REPO / "docs" / "deploy.md"
SECTION = "## Measured (make bench-routing)"
BALANCES = ("bounded", "consistent", "roundrobin")
TIERS = ("hbm", "dram", "ssd", "remote", "none")
MAX_TOKENS = 16
MAX_NUM_SEQS = 2


@dataclass
class Turn:
    kind: str
    session: int
    turn: int  # 1-based
    ttft: float
    cached: int
    tier: str
    server: str
    decision: str


@dataclass
class RunResult:
    balance: str
    turns: list[Turn] = field(default_factory=list)
    seconds: float = 0.0
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class Session:
    kind: str  # busy, short, shared, chain
    index: int
    texts: list[str]
    think: float
    start: float
    system: str | None = None


def log(msg: str) -> None:
    print(f"[bench-routing {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def replay(seed: int = 7) -> list[Session]:
    rng = random.Random(seed)
    busy = conversations(4, 8, (500, 700), (20, 60))
    short = conversations(9, 3, (300, 400), (20, 60))
    system = conversations(1, 1, (550, 650), (1, 2))[0][0]
    questions = [t for conv in conversations(3, 3, (40, 80), (20, 40)) for t in conv]
    sessions = [Session("busy", i, texts, 1.0, rng.uniform(0, 5)) for i, texts in enumerate(busy)]
    sessions += [Session("short", i, texts, 6.0, rng.uniform(0, 10)) for i, texts in enumerate(short[:6])]
    sessions += [Session("shared", i, questions[3 * i:3 * i + 3], 6.0, rng.uniform(0, 10),
                         "You answer questions using this reference:\n\n" + system) for i in range(3)]
    sessions += [Session("chain", i, texts, 6.0, rng.uniform(0, 10)) for i, texts in enumerate(short[6:])]
    return sessions


def chat_turn(client: OpenAI, model: str, s: Session, messages: list[dict]) -> tuple[str, Turn]:
    ttft, _, answer, headers, _, cached = multiturn.chat_turn(client, model, f"{s.kind}-{s.index}", messages,
                                                              MAX_TOKENS)
    turn = sum(m["role"] == "user" for m in messages)
    return answer, Turn(s.kind, s.index, turn, ttft, cached, headers.get("x-cache-tier", "none"),
                        headers.get("x-strata-upstream", ""), headers.get("x-strata-route", ""))


def response_turn(client: OpenAI, model: str, s: Session, text: str, previous: str | None,
                  turn: int) -> tuple[str, Turn]:
    t0 = time.perf_counter()
    raw = client.responses.with_raw_response.create(model=model, input=text, previous_response_id=previous,
                                                    max_output_tokens=MAX_TOKENS, temperature=0, stream=True)
    ttft, rid, cached = None, "", 0
    for event in raw.parse():
        if event.type == "response.output_text.delta" and ttft is None:
            ttft = time.perf_counter() - t0
        if event.type in ("response.completed", "response.incomplete"):  # incomplete: max_output_tokens hit
            rid = event.response.id
            usage = event.response.usage
            cached = usage.input_tokens_details.cached_tokens if usage is not None else 0
    if not rid:
        raise RuntimeError("a streamed response ended without its final event")
    return rid, Turn(s.kind, s.index, turn, ttft or time.perf_counter() - t0, cached,
                     raw.headers.get("x-cache-tier", "none"), raw.headers.get("x-strata-upstream", ""),
                     raw.headers.get("x-strata-route", ""))


def run(balance: str, args: argparse.Namespace, sessions: list[Session], workdir: Path) -> RunResult:
    store = RedisServer(workdir / f"{balance}-redis")
    flags = ["--kv-cache-gb", str(args.kv_cache_gb), "--dram-kv-gb", str(args.dram_kv_gb), "--dtype", "float32",
             "--max-num-seqs", str(MAX_NUM_SEQS), *store.strata_args()]
    cluster = Cluster(workdir / balance, flags, upstream_header=True, balance=balance)
    result = RunResult(balance)
    lock = threading.Lock()
    errors: list[BaseException] = []
    try:
        log(f"{balance}: starting {args.instances} servers and the router")
        cluster.add(args.instances)
        client = OpenAI(base_url=cluster.router_url + "/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        t0 = time.perf_counter()

        def talk(s: Session) -> None:
            rng = random.Random(f"{s.kind}-{s.index}")  # the same think times in every run
            time.sleep(s.start)
            messages: list[dict] = [{"role": "system", "content": s.system}] if s.system else []
            previous = None
            for t, text in enumerate(s.texts, 1):
                if s.kind == "chain":
                    previous, turn = response_turn(client, model, s, text, previous, t)
                else:
                    messages.append({"role": "user", "content": text})
                    answer, turn = chat_turn(client, model, s, messages)
                    messages.append({"role": "assistant", "content": answer})
                with lock:
                    result.turns.append(turn)
                time.sleep(rng.expovariate(1 / s.think))

        def session(s: Session) -> None:
            try:
                talk(s)
            except BaseException as e:  # a failed turn fails the run, after the other sessions end
                errors.append(e)

        threads = [threading.Thread(target=session, args=(s,)) for s in sessions]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise RuntimeError(f"{balance}: {len(errors)} sessions failed") from errors[0]
        result.seconds = time.perf_counter() - t0
        result.decisions = cluster.router_metrics()
        log(f"{balance}: {len(result.turns)} turns in {result.seconds:.0f} s")
    finally:
        cluster.stop()
        store.stop()
    return result


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(runs: list[RunResult]) -> dict:
    """Over every run of one balancing: TTFTs and tiers pooled, walls and requests per server per run."""
    later = [t for r in runs for t in r.turns if t.turn >= 2]
    tiers = Counter(t.tier if t.cached > 0 else "none" for t in later)
    per_server = [sorted(Counter(t.server for t in r.turns).values(), reverse=True) for r in runs]
    decisions = Counter[str]()
    for r in runs:
        for (_, decision), n in r.decisions.items():
            decisions[decision] += n
    misses = Counter(t.kind for t in later if t.cached == 0)
    slowest = sorted(later, key=lambda t: -t.ttft)[:3]
    return {"misses": misses, "slowest": [(t.kind, t.session, t.turn, round(t.ttft, 1)) for t in slowest],
            "wall": statistics.mean(r.seconds for r in runs), "walls": [r.seconds for r in runs],
            "p50": statistics.median(t.ttft for t in later), "p99": quantile([t.ttft for t in later], 0.99),
            "hit": sum(t.cached > 0 for t in later) / len(later), "tiers": tiers, "later": len(later),
            "per_server": per_server, "decisions": decisions}


def write_doc(results: dict[str, list[RunResult]], args: argparse.Namespace, argv: list[str]) -> None:
    rows = {balance: summary(runs) for balance, runs in results.items()}
    lines = [SECTION, "",
             "| routing | whole replay | p50 TTFT, turns 2+ | p99 TTFT, turns 2+ | turns 2+ that reused KV | "
             "by tier: " + " / ".join(TIERS) + " | requests per server | router decisions |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for balance, s in rows.items():
        decisions = ", ".join(f"{d} {n}" for d, n in sorted(s["decisions"].items(), key=lambda kv: -kv[1]))
        walls = " + ".join(f"{w:.0f}" for w in s["walls"])
        servers = "; ".join(" / ".join(map(str, p)) for p in s["per_server"])
        lines.append(f"| {balance} | {walls} s | {s['p50'] * 1000:.0f} ms | {s['p99'] * 1000:.0f} ms | "
                     f"{s['hit']:.0%} | " + " / ".join(str(s["tiers"][t]) for t in TIERS)
                     + f" | {servers} | {decisions} |")
    if "bounded" in rows and "consistent" in rows:
        b, c = rows["bounded"], rows["consistent"]
        lines += ["", f"Bounded load over plain consistent hashing: whole replay (mean of the runs) "
                  f"{b['wall'] / c['wall']:.2f}x, "
                  f"p99 TTFT of turns 2+ {b['p99'] / c['p99']:.2f}x, p50 {b['p50'] / c['p50']:.2f}x, hit rate "
                  f"{b['hit'] / c['hit']:.2f}x."]
    command = " ".join(["python benchmarks/routing.py", *argv])
    lines += ["", f"Command: `{command}` (`make bench-routing`), run {datetime.date.today().isoformat()} on "
              f"{cpu_name()}: {args.instances} strata servers (one compute thread each, float32, `--kv-cache-gb "
              f"{args.kv_cache_gb} --dram-kv-gb {args.dram_kv_gb} --max-num-seqs {MAX_NUM_SEQS}`, a shared redis "
              f"tier) and HAProxy on one "
              f"machine. The replay:", "", *__doc__.split(chr(10) + chr(10))[3:5], ""]
    write_heading_section(DOC, SECTION, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--kv-cache-gb", type=float, default=0.1)
    ap.add_argument("--dram-kv-gb", type=float, default=0.5)
    ap.add_argument("--balance", nargs="+", default=list(BALANCES), choices=BALANCES)
    ap.add_argument("--repeats", type=int, default=2, help="runs per balancing, the balancings taking turns")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    os.environ["OMP_NUM_THREADS"] = "1"  # the servers inherit it: one core's worth of compute each
    sessions = replay()
    log(f"replay: {len(sessions)} sessions, {sum(len(s.texts) for s in sessions)} turns")
    results: dict[str, list[RunResult]] = {b: [] for b in args.balance}
    with tempfile.TemporaryDirectory(prefix="strata-bench-routing-") as tmp:
        for n in range(args.repeats):
            for balance in args.balance:
                results[balance].append(run(balance, args, sessions, Path(tmp) / f"run{n}"))
                s = summary(results[balance][-1:])
                log(f"{balance}: wall {s['wall']:.0f} s, p50 {s['p50'] * 1000:.0f} ms, p99 {s['p99'] * 1000:.0f} "
                    f"ms, hit {s['hit']:.0%}, tiers {dict(s['tiers'])}, per server {s['per_server']}, decisions "
                    f"{dict(s['decisions'])}, turns 2+ without reuse by kind {dict(s['misses'])}, slowest turns "
                    f"{s['slowest']}")
    if not args.no_doc:
        write_doc(results, args, shown)
        log(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
