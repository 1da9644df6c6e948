"""Multi-turn chat against the real server: sessions off vs CachedAttention with LRU vs scheduler-aware tiers.

S concurrent chat sessions of T turns each talk to `strata serve` (a subprocess on loopback) through the
official `openai` client with streaming: a chat about a document. The first user turn brings a passage of
Python's own module documentation (pydoc plain text, offline; --doc-tokens long) and asks for a summary;
each later turn asks a short question about one more paragraph (--question-tokens). Answers are greedy
and at most --max-tokens long. Every session is a client of its own that sends its next turn after a
random think time (exponential, mean --think seconds; sessions start staggered), so the sessions
interleave: the device pool (--kv-cache-gb) cannot hold every session and the DRAM tier (--dram-kv-gb)
pushes some of them to the SSD tier (a temporary --ssd-dir). When more sessions are ready than
--max-num-seqs, requests queue inside the server, which is what the scheduler-aware policy looks ahead into.

Three modes, each against a fresh server: sessions off (`--no-session-cache`, every turn recomputes its
history), `--eviction-policy lru` and `--eviction-policy scheduler`. Per turn number: median and p90 TTFT
(client-side: request sent to first content chunk, queueing included), prefill throughput (all prompt
tokens / TTFT, summed), hits per tier (X-Cache-Tier header) and, per mode, the time the runner stalled on
layer loads vs the load time overlapped with compute (/metrics deltas over the run).
Writes docs/multiturn.md and docs/multiturn.png.

    python benchmarks/multiturn.py             # S=8 sessions x T=6 turns (several minutes on 2 cores)
    python benchmarks/multiturn.py --quick     # S=4 x T=4, smaller tiers
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from machine import cpu_name  # benchmarks/ is on sys.path when run as a script
from openai import OpenAI
from server_process import Server

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "multiturn.md"
PLOT = DOC.with_suffix(".png")
MODES = ("off", "lru", "scheduler")
TIERS = ("hbm", "dram", "ssd", "none")
SYSTEM = "You are a concise assistant. Answer questions about Python's standard library documentation."
# Modules whose pydoc pages are mostly prose (no environment-dependent DATA sections).
MODULES = ("textwrap", "argparse", "json", "logging", "functools", "itertools", "collections", "pathlib",
           "csv", "string", "datetime", "heapq", "bisect", "difflib", "statistics", "fractions", "decimal",
           "queue", "threading", "contextlib", "dataclasses", "enum", "shlex", "fnmatch", "calendar")
OPENING = "Here is part of the documentation of a Python module.\n\n{doc}\n\nSummarize it in one sentence."
QUESTIONS = ("And what does this part say?", "What is the main point of this?", "Explain this to a beginner:",
             "Which function or class does this describe?")
# benchmarks/shared_prefix.py owns this part of docs/multiturn.md; a rewrite here keeps it.
SHARED_BEGIN, SHARED_END = "<!-- shared-prefix:begin -->", "<!-- shared-prefix:end -->"


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- workload


def conversations(sessions: int, turns: int, doc: tuple[int, int], question: tuple[int, int]) -> list[list[str]]:
    """Per session, its T user messages: a document passage of doc[0]..doc[1] tokens with a request to
    summarize it, then short questions each quoting one paragraph (question[0]..question[1] tokens)."""
    from strata.engine.skip.corpus import module_doc  # cleaned of paths and object addresses
    from strata.engine.tokenizer import Tokenizer
    from strata.engine.weights.model_files import resolve_model

    tok = Tokenizer(resolve_model("default").directory)

    def ntok(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    paragraphs: list[tuple[str, int]] = []
    for name in MODULES:
        try:
            text = module_doc(name)
        except ImportError:
            continue
        for para in re.split(r"\n\s*\n", text):
            para = "\n".join(line.strip() for line in para.strip().splitlines())
            if len(para) >= 40:  # no headings
                paragraphs.append((para, ntok(para)))
    pool = iter(paragraphs)
    out: list[list[str]] = []
    try:
        for _ in range(sessions):
            passage: list[str] = []
            size = 0
            while size < doc[0]:
                para, n = next(pool)
                if size + n <= doc[1]:
                    passage.append(para)
                    size += n
            msgs = [OPENING.format(doc="\n\n".join(passage))]
            while len(msgs) < turns:
                para, n = next(pool)
                if question[0] <= n <= question[1]:
                    msgs.append(f"{QUESTIONS[len(msgs) % len(QUESTIONS)]}\n\n{para}")
            out.append(msgs)
    except StopIteration:
        raise RuntimeError(f"corpus too small for {sessions} sessions of {turns} turns") from None
    return out


def mode_flags(mode: str, args: argparse.Namespace, ssd_dir: Path) -> list[str]:
    common = ["--kv-cache-gb", str(args.kv_cache_gb), "--max-num-seqs", str(args.max_num_seqs)]
    if mode == "off":
        return [*common, "--no-session-cache"]
    return [*common, "--eviction-policy", mode, "--dram-kv-gb", str(args.dram_kv_gb),
            "--ssd-dir", str(ssd_dir), "--ssd-kv-gb", str(args.ssd_kv_gb), *getattr(args, "extra_flags", [])]


# ---------------------------------------------------------------- one mode


@dataclass
class Turn:
    session: int
    turn: int  # 1-based
    ttft: float
    total: float
    prompt_tokens: int
    cached_tokens: int
    tier: str


@dataclass
class ModeResult:
    mode: str
    turns: list[Turn] = field(default_factory=list)
    start: dict[str, float] = field(default_factory=dict)  # /metrics before the first turn
    final: dict[str, float] = field(default_factory=dict)  # and after the last one
    wall: float = 0.0

    def delta(self, name: str, **labels: str) -> float:
        return metric(self.final, name, **labels) - metric(self.start, name, **labels)


def metric(m: dict[str, float], name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return m.get(key, 0.0)


def chat_turn(client: OpenAI, model: str, session: str, messages: list[dict[str, str]],
              max_tokens: int) -> tuple[float, float, str, dict[str, str], int, int]:
    """One streamed turn: (ttft, total seconds, answer, response headers, prompt tokens, cached tokens)."""
    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Session-ID": session})
    ttft = None
    parts: list[str] = []
    prompt_tokens = cached = 0
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
    total = time.perf_counter() - t0
    # An answer with no content at all (immediate EOS): the first chunk is the best we have.
    return ttft if ttft is not None else total, total, "".join(parts), dict(raw.headers), prompt_tokens, cached


def run_mode(mode: str, args: argparse.Namespace, texts: list[list[str]]) -> ModeResult:
    res = ModeResult(mode)
    with tempfile.TemporaryDirectory(prefix="strata-multiturn-") as tmp:
        t_start = time.perf_counter()
        server = Server(mode_flags(mode, args, Path(tmp) / "ssd"))
        try:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900)
            model = client.models.list().data[0].id
            run_id = f"{mode}-{os.getpid()}-{int(time.time())}"  # fresh keys even on a reused --ssd-dir
            lock = threading.Lock()
            done = Counter[int]()

            def session(s: int) -> None:
                # The same think times in every mode: seeded by the session.
                rng = random.Random(1000 + s)
                time.sleep(s * args.think / 2)  # staggered start
                history = [{"role": "system", "content": SYSTEM}]
                for t, text in enumerate(texts[s], 1):
                    msgs = [*history, {"role": "user", "content": text}]
                    ttft, total, answer, headers, ptoks, cached = chat_turn(
                        client, model, f"{run_id}-s{s}", msgs, args.max_tokens)
                    tier = headers.get("x-cache-tier", "none")
                    if int(headers.get("x-cached-tokens", cached)) != cached:
                        raise RuntimeError("X-Cached-Tokens and usage.cached_tokens disagree")
                    history = [*msgs, {"role": "assistant", "content": answer}]
                    with lock:
                        res.turns.append(Turn(s, t, ttft, total, ptoks, cached, tier))
                        done[t] += 1
                        if done[t] == len(texts):
                            rows = [r for r in res.turns if r.turn == t]
                            tiers = Counter(r.tier for r in rows)
                            log(f"  {mode:<9} turn {t}/{args.turns} of every session: median TTFT "
                                f"{ms(median(rows))}, prompt {statistics.mean(r.prompt_tokens for r in rows):5.0f} "
                                f"tok, cached {statistics.mean(r.cached_tokens for r in rows):5.0f}, "
                                + " ".join(f"{k}={tiers[k]}" for k in TIERS)
                                + f" ({time.perf_counter() - t_start:.0f} s)")
                    time.sleep(rng.expovariate(1 / args.think) if args.think > 0 else 0)

            res.start = server.metrics()
            with ThreadPoolExecutor(len(texts)) as pool:
                for f in [pool.submit(session, s) for s in range(len(texts))]:
                    f.result()
            res.final = server.metrics()
        finally:
            server.stop()
        res.wall = time.perf_counter() - t_start
    return res


# ---------------------------------------------------------------- report


def median(rows: list[Turn]) -> float:
    return statistics.median(r.ttft for r in rows)


def p90(rows: list[Turn]) -> float:
    xs = sorted(r.ttft for r in rows)
    return xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]  # nearest rank on few samples


def ms(s: float) -> str:
    return f"{s * 1e3:,.0f} ms"


def throughput(rows: list[Turn]) -> float:
    return sum(r.prompt_tokens for r in rows) / sum(r.ttft for r in rows)


@dataclass
class Goal:
    text: str
    ok: bool


def evaluate(results: dict[str, ModeResult], turns: int) -> tuple[list[Goal], dict[str, float]]:
    off = [r for r in results["off"].turns if r.turn >= 3]
    facts: dict[str, float] = {}
    goals: list[Goal] = []
    for mode in ("lru", "scheduler"):
        rows = [r for r in results[mode].turns if r.turn >= 3]
        cut = 1 - median(rows) / median(off)
        facts[f"cut_{mode}"] = cut
        goals.append(Goal(f"median TTFT from turn 3 on, {mode} vs sessions off: {median(rows) * 1e3:.0f} vs "
                          f"{median(off) * 1e3:.0f} ms, {cut:.0%} lower (goal: at least 85% lower)", cut >= 0.85))
    dram = {m: sum(r.tier == "dram" for r in results[m].turns) for m in ("lru", "scheduler")}
    goals.append(Goal(f"hits served from DRAM: scheduler {dram['scheduler']}, LRU {dram['lru']} "
                      "(goal: scheduler at least as many)", dram["scheduler"] >= dram["lru"]))
    for mode in ("lru", "scheduler"):
        res = results[mode]
        # The server charges a load's stalls to the slowest tier it reads from.
        stall = res.delta("strata_kv_load_stall_seconds_total", tier="dram")
        ttft = sum(r.ttft for r in res.turns if r.tier == "dram")
        share = stall / ttft if ttft else float("nan")
        facts[f"stall_dram_{mode}"] = share
        goals.append(Goal(f"{mode}: load stalls of DRAM hits {stall * 1e3:.0f} ms = {share:.1%} of their TTFT "
                          "(goal: under 10%)", ttft > 0 and share < 0.10))
    return goals, facts


def table(results: dict[str, ModeResult], turns: int) -> str:
    off = results["off"]
    lines = ["| turn | mode | prompt tok | cached tok | median TTFT | p90 TTFT | median vs off | prefill tok/s "
             "| vs off | hits hbm / dram / ssd / miss |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in range(1, turns + 1):
        base = [r for r in off.turns if r.turn == t]
        for mode, res in results.items():
            rows = [r for r in res.turns if r.turn == t]
            tiers = Counter(r.tier for r in rows)
            lines.append(
                f"| {t} | {mode} | {statistics.mean(r.prompt_tokens for r in rows):.0f} "
                f"| {statistics.mean(r.cached_tokens for r in rows):.0f} | {ms(median(rows))} | {ms(p90(rows))} "
                f"| {median(rows) / median(base):.2f}x | {throughput(rows):,.0f} "
                f"| {throughput(rows) / throughput(base):.1f}x "
                f"| {' / '.join(str(tiers[k]) for k in TIERS)} |")
    lines += ["", "| mode (turns 2+) | hit rate | hbm | dram | ssd | TTFT hbm | TTFT dram | TTFT ssd | TTFT miss "
              "| load stalled dram / ssd | load overlapped | prefetches issued / used | evictions hbm / dram / ssd "
              "| wall |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---:|"]
    for mode, res in results.items():
        rows = [r for r in res.turns if r.turn >= 2]
        n = len(rows)
        tiers = Counter(r.tier for r in rows)
        by = {k: [r for r in rows if r.tier == k] for k in TIERS}
        d = res.delta
        lines.append(
            f"| {mode} | {(n - tiers['none']) / n:.0%} | "
            + " | ".join(f"{tiers[k] / n:.0%}" for k in ("hbm", "dram", "ssd"))
            + " | " + " | ".join(ms(median(by[k])) if by[k] else "-" for k in TIERS)
            + " | " + " / ".join(f"{d('strata_kv_load_stall_seconds_total', tier=k) * 1e3:.0f}"
                                 for k in ("dram", "ssd")) + " ms"
            + f" | {d('strata_kv_load_seconds_total', kind='overlapped') * 1e3:.0f} ms"
            + f" | {d('strata_kv_prefetches_issued_total'):.0f} / {d('strata_kv_prefetches_used_total'):.0f}"
            + " | " + " / ".join(f"{d('strata_kv_evictions_total', tier=k):.0f}" for k in ("hbm", "dram", "ssd"))
            + f" | {res.wall:.0f} s |")
    return "\n".join(lines)


def plot(results: dict[str, ModeResult], turns: int, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = {"off": "sessions off (recompute)", "lru": "CachedAttention, LRU",
              "scheduler": "CachedAttention, scheduler-aware"}
    xs = list(range(1, turns + 1))
    for mode, res in results.items():
        ys = [median([r for r in res.turns if r.turn == t]) * 1e3 for t in xs]
        ax.plot(xs, ys, marker="o", label=labels[mode])
    ax.set_xlabel("turn")
    ax.set_ylabel("median TTFT (ms)")
    ax.set_xticks(xs)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("strata multi-turn chat: time to first token per turn")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="S=4 sessions x T=4 turns with smaller tiers")
    ap.add_argument("--sessions", type=int, default=None, help="concurrent sessions S (default 8, --quick 4)")
    ap.add_argument("--turns", type=int, default=None, help="turns per session T (default 6, --quick 4)")
    ap.add_argument("--think", type=float, default=8.0, help="mean think time between a session's turns (s)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="server running batch (default 4, --quick 2; "
                    "fewer than the sessions: requests queue when many are ready at once)")
    ap.add_argument("--max-tokens", type=int, default=32, help="answer length bound")
    ap.add_argument("--doc-tokens", type=int, nargs=2, default=[700, 900], metavar=("MIN", "MAX"),
                    help="tokens of the document passage in the first turn")
    ap.add_argument("--question-tokens", type=int, nargs=2, default=[20, 80], metavar=("MIN", "MAX"),
                    help="tokens of the paragraph each later question quotes")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="device pool (default 0.3, --quick 0.15)")
    ap.add_argument("--dram-kv-gb", type=float, default=None, help="DRAM tier (default 0.2, --quick 0.06)")
    ap.add_argument("--ssd-kv-gb", type=float, default=4.0, help="SSD tier")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/multiturn.*")
    args = ap.parse_args(argv)
    args.sessions = args.sessions or (4 if args.quick else 8)
    args.turns = args.turns or (4 if args.quick else 6)
    args.max_num_seqs = args.max_num_seqs or (2 if args.quick else 4)
    # The device pool holds the running sequences and a few idle sessions, not all of them.
    args.kv_cache_gb = args.kv_cache_gb or (0.15 if args.quick else 0.3)
    args.dram_kv_gb = args.dram_kv_gb or (0.06 if args.quick else 0.2)
    if "off" not in args.modes:
        args.modes = ["off", *args.modes]  # ratios are against sessions off

    t_start = time.perf_counter()
    log(f"workload: {args.sessions} sessions x {args.turns} turns, a {args.doc_tokens[0]}-{args.doc_tokens[1]} "
        f"token document then questions quoting {args.question_tokens[0]}-{args.question_tokens[1]} tokens "
        f"(pydoc of the stdlib), answers <= {args.max_tokens} tokens, think time {args.think} s, max-num-seqs "
        f"{args.max_num_seqs}")
    texts = conversations(args.sessions, args.turns, tuple(args.doc_tokens), tuple(args.question_tokens))
    log(f"tiers: device pool {args.kv_cache_gb} GiB, DRAM {args.dram_kv_gb} GiB, SSD {args.ssd_kv_gb} GiB")

    results: dict[str, ModeResult] = {}
    for mode in args.modes:
        log(f"mode {mode}: starting a fresh server ...")
        results[mode] = run_mode(mode, args, texts)
        log(f"mode {mode}: done in {results[mode].wall:.0f} s")

    body = table(results, args.turns)
    goals, _ = evaluate(results, args.turns) if {"lru", "scheduler"} <= set(results) else ([], {})
    print()
    print(body)
    print()
    for g in goals:
        print(f"[{'met' if g.ok else 'MISSED'}] {g.text}")

    if not args.no_doc:
        argv_shown = sys.argv[1:] if argv is None else argv
        cmd = shlex.join(["python", "benchmarks/multiturn.py", *argv_shown])
        meta = [f"- command: `{cmd}`",
                f"- date: {datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores ({cpu_name()}), "
                f"{device()}, Python {platform.python_version()}",
                f"- workload: {args.sessions} sessions x {args.turns} turns, each session a client with "
                f"exponential think times (mean {args.think} s); a {args.doc_tokens[0]}-{args.doc_tokens[1]} token "
                f"document passage, then questions quoting {args.question_tokens[0]}-{args.question_tokens[1]} "
                f"tokens of pydoc text; greedy answers of at most {args.max_tokens} tokens",
                f"- server: SmolLM2-135M-Instruct float32, `--kv-cache-gb {args.kv_cache_gb} --max-num-seqs "
                f"{args.max_num_seqs}`; sessions on: `--dram-kv-gb {args.dram_kv_gb} --ssd-kv-gb "
                f"{args.ssd_kv_gb} --ssd-dir <temp dir>`",
                f"- total wall time {time.perf_counter() - t_start:.0f} s"]
        text = ("# Multi-turn chat benchmark (CachedAttention)\n\n"
                "Generated by `benchmarks/multiturn.py` (`make bench-multiturn`); see its docstring for what is "
                "measured. TTFT is client-side (request sent to first content chunk, queueing included); "
                "prefill tok/s = all prompt tokens (cached ones included) / TTFT; hits are the `X-Cache-Tier` "
                "header per request; load times, prefetches and evictions are `/metrics` deltas over the run.\n\n"
                + "\n".join(meta) + "\n\n## Per turn\n\n" + body + "\n\n## Goals\n\n"
                + "\n".join(f"- **{'met' if g.ok else 'missed'}**: {g.text}" for g in goals) + "\n")
        if plot(results, args.turns, PLOT):
            text += f"\n![median TTFT per turn]({PLOT.name})\n"
        DOC.write_text(text + kept_section(DOC.read_text() if DOC.exists() else ""))
        log(f"wrote {DOC.relative_to(REPO)} and {PLOT.relative_to(REPO)}")
    return 0


def kept_section(old: str) -> str:
    """The shared-prefix section of the doc being replaced (markers included), to append to the new text."""
    begin, end = old.find(SHARED_BEGIN), old.find(SHARED_END)
    if begin < 0 or end < begin:
        return ""
    return "\n" + old[begin:end + len(SHARED_END)] + "\n"


def device() -> str:
    import torch  # already imported by the tokenizer's package

    return f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"


if __name__ == "__main__":
    raise SystemExit(main())
