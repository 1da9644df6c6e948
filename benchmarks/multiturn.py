"""Multi-turn chat against the real server: sessions off vs CachedAttention with LRU vs scheduler-aware tiers.

S concurrent chat sessions of T turns each talk to `strata serve` (a subprocess on loopback) through the
official `openai` client with streaming. User turns are paragraphs of Python's own module documentation
(pydoc plain text, offline); answers are greedy and at most --max-tokens long. Sessions are interleaved
round-robin by turn (turn t of every session, then turn t+1, ...) with --concurrency requests in flight, so
the device pool (--kv-cache-gb) cannot hold every session and the DRAM tier (--dram-kv-gb) pushes some of
them to the SSD tier (a temporary --ssd-dir). --max-num-seqs is below --concurrency so requests queue
inside the server, which is what the scheduler-aware policy looks ahead into.

Three modes, each against a fresh server: sessions off (`--no-session-cache`, every turn recomputes its
history), `--eviction-policy lru` and `--eviction-policy scheduler`. Per turn number: median and p90 TTFT
(client-side: request sent to first content chunk, queueing included), prefill throughput (all prompt
tokens / TTFT, summed), hits per tier (X-Cache-Tier header, checked against /metrics) and the time the
runner stalled on layer loads vs the load time overlapped with compute (/metrics deltas per turn).
Writes docs/multiturn.md and docs/multiturn.png.

    python benchmarks/multiturn.py             # S=8 sessions x T=6 turns (a few minutes on 2 cores)
    python benchmarks/multiturn.py --quick     # S=4 x T=4, smaller tiers
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from openai import OpenAI

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
PROMPTS = ("Summarize this part of the documentation in one sentence:",
           "What is the main point of the following text?",
           "Explain the following documentation to a beginner:",
           "Which function or class does this text describe, and what does it do?")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- workload


def user_turns(count: int, lo: int, hi: int) -> list[str]:
    """`count` user messages of lo..hi tokens (SmolLM2 tokenizer): an instruction plus whole doc paragraphs."""
    from strata.engine.skip.corpus import module_doc  # cleaned of paths and object addresses
    from strata.engine.tokenizer import Tokenizer
    from strata.engine.weights.model_files import resolve_model

    tok = Tokenizer(resolve_model("default").directory)

    def ntok(s: str) -> int:
        return len(tok.encode(s, add_special_tokens=False))

    paragraphs: list[str] = []
    for name in MODULES:
        try:
            text = module_doc(name)
        except ImportError:
            continue
        for para in re.split(r"\n\s*\n", text):
            para = "\n".join(line.strip() for line in para.strip().splitlines())
            if len(para) >= 40 and ntok(para) <= hi:  # no headings, no walls of text
                paragraphs.append(para)
    turns: list[str] = []
    current: list[str] = []
    for para in paragraphs:
        current.append(para)
        msg = PROMPTS[len(turns) % len(PROMPTS)] + "\n\n" + "\n\n".join(current)
        n = ntok(msg)
        if n > hi:
            current = [para]  # this paragraph starts the next turn instead
        elif n >= lo:
            turns.append(msg)
            current = []
            if len(turns) == count:
                return turns
    raise RuntimeError(f"corpus too small: {len(turns)} of {count} user turns")


# ---------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m strata serve` on a loopback port; stopped with SIGTERM."""

    def __init__(self, flags: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "strata", "serve", "--port", str(self.port), "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {shlex.join(cmd)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not become healthy in 300 s")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value} (histogram buckets dropped)."""
        out: dict[str, float] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            if line.startswith("#") or "_bucket{" in line or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def mode_flags(mode: str, args: argparse.Namespace, ssd_dir: Path) -> list[str]:
    common = ["--kv-cache-gb", str(args.kv_cache_gb), "--max-num-seqs", str(args.max_num_seqs)]
    if mode == "off":
        return [*common, "--no-session-cache"]
    return [*common, "--eviction-policy", mode, "--dram-kv-gb", str(args.dram_kv_gb),
            "--ssd-dir", str(ssd_dir), "--ssd-kv-gb", str(args.ssd_kv_gb)]


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
class TurnMetrics:
    """/metrics deltas over one round (turn t of every session)."""

    stalled: float = 0.0
    overlapped: float = 0.0
    hits: Counter[str] = field(default_factory=Counter)
    prefetches: float = 0.0


@dataclass
class ModeResult:
    mode: str
    turns: list[Turn] = field(default_factory=list)
    rounds: dict[int, TurnMetrics] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0


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
            client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            histories: list[list[dict[str, str]]] = [[{"role": "system", "content": SYSTEM}] for _ in texts]
            run_id = f"{mode}-{os.getpid()}-{int(time.time())}"  # fresh keys even on a reused --ssd-dir
            lock = threading.Lock()

            def one(s: int, t: int) -> None:
                msgs = [*histories[s], {"role": "user", "content": texts[s][t - 1]}]
                ttft, total, answer, headers, ptoks, cached = chat_turn(
                    client, model, f"{run_id}-s{s}", msgs, args.max_tokens)
                tier = headers.get("x-cache-tier", "none")
                if int(headers.get("x-cached-tokens", cached)) != cached:
                    raise RuntimeError("X-Cached-Tokens and usage.cached_tokens disagree")
                histories[s] = [*msgs, {"role": "assistant", "content": answer}]
                with lock:
                    res.turns.append(Turn(s, t, ttft, total, ptoks, cached, tier))

            before = server.metrics()
            with ThreadPoolExecutor(args.concurrency) as pool:
                for t in range(1, args.turns + 1):
                    t0 = time.perf_counter()
                    # Round-robin by turn; every round starts at a different session so no session is
                    # always first in the queue.
                    order = [(t - 1 + i) % len(texts) for i in range(len(texts))]
                    for f in [pool.submit(one, s, t) for s in order]:
                        f.result()
                    after = server.metrics()
                    tm = TurnMetrics(
                        stalled=metric(after, "strata_kv_load_seconds_total", kind="stalled")
                        - metric(before, "strata_kv_load_seconds_total", kind="stalled"),
                        overlapped=metric(after, "strata_kv_load_seconds_total", kind="overlapped")
                        - metric(before, "strata_kv_load_seconds_total", kind="overlapped"),
                        prefetches=metric(after, "strata_kv_prefetches_issued_total")
                        - metric(before, "strata_kv_prefetches_issued_total"))
                    for tier in ("hbm", "dram", "ssd"):
                        tm.hits[tier] = int(metric(after, "strata_kv_hits_total", tier=tier)
                                            - metric(before, "strata_kv_hits_total", tier=tier))
                    tm.hits["none"] = int(metric(after, "strata_kv_misses_total")
                                          - metric(before, "strata_kv_misses_total"))
                    res.rounds[t] = tm
                    before = after
                    rows = [r for r in res.turns if r.turn == t]
                    tiers = Counter(r.tier for r in rows)
                    log(f"  {mode:<9} turn {t}/{args.turns}: median TTFT {ms(median(rows))}, "
                        f"prompt {statistics.mean(r.prompt_tokens for r in rows):5.0f} tok, "
                        f"cached {statistics.mean(r.cached_tokens for r in rows):5.0f}, "
                        + " ".join(f"{k}={tiers[k]}" for k in TIERS)
                        + f", stalled {tm.stalled * 1e3:.0f} ms ({time.perf_counter() - t0:.1f} s)")
            res.final = before
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
    # /metrics has no per-tier stall split: charge every stall of a turn to that turn's DRAM hits unless
    # SSD hits shared it; rounds with SSD hits give an upper bound over DRAM+SSD hits instead.
    for mode in ("lru", "scheduler"):
        res = results[mode]
        stall_dram = ttft_dram = stall_mixed = ttft_mixed = 0.0
        for t, tm in res.rounds.items():
            rows = [r for r in res.turns if r.turn == t]
            loaded = sum(r.ttft for r in rows if r.tier in ("dram", "ssd"))
            stall_mixed += tm.stalled
            ttft_mixed += loaded
            if not any(r.tier == "ssd" for r in rows):
                stall_dram += tm.stalled
                ttft_dram += loaded
        share = stall_dram / ttft_dram if ttft_dram else float("nan")
        mixed = stall_mixed / ttft_mixed if ttft_mixed else float("nan")
        facts[f"stall_dram_{mode}"] = share
        facts[f"stall_loaded_{mode}"] = mixed
        ok = ttft_dram > 0 and share < 0.10
        goals.append(Goal(f"{mode}: load stalls / TTFT of DRAM hits {share:.1%} (turns without SSD hits; all "
                          f"DRAM+SSD hits: {mixed:.1%}; goal: under 10%)", ok))
    return goals, facts


def table(results: dict[str, ModeResult], turns: int) -> str:
    off = results["off"]
    lines = ["| turn | mode | prompt tok | cached tok | median TTFT | p90 TTFT | median vs off | prefill tok/s "
             "| vs off | hits hbm / dram / ssd / miss | stalled / overlapped load |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for t in range(1, turns + 1):
        base = [r for r in off.turns if r.turn == t]
        for mode, res in results.items():
            rows = [r for r in res.turns if r.turn == t]
            tiers = Counter(r.tier for r in rows)
            tm = res.rounds[t]
            lines.append(
                f"| {t} | {mode} | {statistics.mean(r.prompt_tokens for r in rows):.0f} "
                f"| {statistics.mean(r.cached_tokens for r in rows):.0f} | {ms(median(rows))} | {ms(p90(rows))} "
                f"| {median(rows) / median(base):.2f}x | {throughput(rows):,.0f} "
                f"| {throughput(rows) / throughput(base):.1f}x "
                f"| {' / '.join(str(tiers[k]) for k in TIERS)} "
                f"| {tm.stalled * 1e3:.0f} / {tm.overlapped * 1e3:.0f} ms |")
    lines += ["", "| mode (turns 2+) | hit rate | hbm | dram | ssd | TTFT hbm | TTFT dram | TTFT ssd | TTFT miss "
              "| stalled | overlapped | prefetches | evictions hbm / dram / ssd | wall |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for mode, res in results.items():
        rows = [r for r in res.turns if r.turn >= 2]
        n = len(rows)
        tiers = Counter(r.tier for r in rows)
        by = {k: [r for r in rows if r.tier == k] for k in TIERS}
        f = res.final
        lines.append(
            f"| {mode} | {(n - tiers['none']) / n:.0%} | "
            + " | ".join(f"{tiers[k] / n:.0%}" for k in ("hbm", "dram", "ssd"))
            + " | " + " | ".join(ms(median(by[k])) if by[k] else "-" for k in TIERS)
            + f" | {metric(f, 'strata_kv_load_seconds_total', kind='stalled') * 1e3:.0f} ms"
            + f" | {metric(f, 'strata_kv_load_seconds_total', kind='overlapped') * 1e3:.0f} ms"
            + f" | {metric(f, 'strata_kv_prefetches_issued_total'):.0f}"
            + " | " + " / ".join(f"{metric(f, 'strata_kv_evictions_total', tier=k):.0f}"
                                 for k in ("hbm", "dram", "ssd"))
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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="S=4 sessions x T=4 turns with smaller tiers")
    ap.add_argument("--sessions", type=int, default=None, help="concurrent sessions S (default 8, --quick 4)")
    ap.add_argument("--turns", type=int, default=None, help="turns per session T (default 6, --quick 4)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--max-num-seqs", type=int, default=2, help="server running batch (below --concurrency: "
                    "requests queue)")
    ap.add_argument("--max-tokens", type=int, default=32, help="answer length bound")
    ap.add_argument("--min-user-tokens", type=int, default=150)
    ap.add_argument("--max-user-tokens", type=int, default=250)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="device pool (default 0.15, --quick 0.08)")
    ap.add_argument("--dram-kv-gb", type=float, default=None, help="DRAM tier (default 0.2, --quick 0.06)")
    ap.add_argument("--ssd-kv-gb", type=float, default=4.0, help="SSD tier")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/multiturn.*")
    args = ap.parse_args(argv)
    args.sessions = args.sessions or (4 if args.quick else 8)
    args.turns = args.turns or (4 if args.quick else 6)
    args.kv_cache_gb = args.kv_cache_gb or (0.08 if args.quick else 0.15)
    args.dram_kv_gb = args.dram_kv_gb or (0.06 if args.quick else 0.2)
    if "off" not in args.modes:
        args.modes = ["off", *args.modes]  # ratios are against sessions off

    t_start = time.perf_counter()
    log(f"workload: {args.sessions} sessions x {args.turns} turns, user turns of {args.min_user_tokens}-"
        f"{args.max_user_tokens} tokens (pydoc of the stdlib), answers <= {args.max_tokens} tokens, "
        f"{args.concurrency} in flight, max-num-seqs {args.max_num_seqs}")
    flat = user_turns(args.sessions * args.turns, args.min_user_tokens, args.max_user_tokens)
    texts = [flat[s * args.turns:(s + 1) * args.turns] for s in range(args.sessions)]
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
                f"- workload: {args.sessions} sessions x {args.turns} turns, round-robin by turn, "
                f"{args.concurrency} requests in flight; user turns of {args.min_user_tokens}-"
                f"{args.max_user_tokens} tokens of pydoc text, greedy answers of at most {args.max_tokens} tokens",
                f"- server: SmolLM2-135M-Instruct float32, `--kv-cache-gb {args.kv_cache_gb} --max-num-seqs "
                f"{args.max_num_seqs}`; sessions on: `--dram-kv-gb {args.dram_kv_gb} --ssd-kv-gb "
                f"{args.ssd_kv_gb} --ssd-dir <temp dir>`",
                f"- total wall time {time.perf_counter() - t_start:.0f} s"]
        text = ("# Multi-turn chat benchmark (CachedAttention)\n\n"
                "Generated by `benchmarks/multiturn.py` (`make bench-multiturn`); see its docstring for what is "
                "measured. TTFT is client-side (request sent to first content chunk, queueing included); "
                "prefill tok/s = all prompt tokens (cached ones included) / TTFT; hits are the `X-Cache-Tier` "
                "header per request; stalled / overlapped load time are `/metrics` deltas over the turn.\n\n"
                + "\n".join(meta) + "\n\n## Per turn\n\n" + body + "\n\n## Goals\n\n"
                + "\n".join(f"- **{'met' if g.ok else 'missed'}**: {g.text}" for g in goals) + "\n")
        if plot(results, args.turns, PLOT):
            text += f"\n![median TTFT per turn]({PLOT.name})\n"
        DOC.write_text(text)
        log(f"wrote {DOC.relative_to(REPO)} and {PLOT.relative_to(REPO)}")
    return 0


def device() -> str:
    import torch  # already imported by the tokenizer's package

    return f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"


if __name__ == "__main__":
    raise SystemExit(main())
