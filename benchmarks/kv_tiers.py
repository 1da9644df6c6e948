"""Compressed tiers under pressure: the multi-turn chat of benchmarks/multiturn.py with a device pool and a DRAM
tier too small for every session, once per --kv-tier-dtype, then vLLM's CPU build with a device pool of the
same tokens, one after the other.

8 sessions x 6 turns (a 700-900 token document, then questions), greedy answers of at most 32 tokens, think
times of 8 s, 4 running sequences; device pool 0.15 GiB (~3.4k tokens of SmolLM2 in float32), DRAM tier 0.1
GiB, SSD tier 4 GiB; the scheduler-aware eviction policy. Per format: bytes of one token in the tiers,
sessions a GiB of DRAM holds (at the run's mean session length), later turns served from each tier, median and
p90 TTFT of turns 2+ (over every run of the format), the whole run (each run). Each format runs --repeats
times (2), the formats taking turns, since one run's p90 moves by a third from run to run. vLLM (prefix
caching, the same 4 running sequences, every core, its recommended allocator: benchmarks/serving.py's launch)
keeps KV only in its device pool; its later turns count as from hbm when its prefix cache gave more than half
of the prompt, else none.

Writes its section of docs/kv-compression.md.

    python benchmarks/kv_tiers.py                 # model dtype, int8, vLLM (make bench-kv-tiers)
    python benchmarks/kv_tiers.py --formats model int8 fp8 int4 --no-vllm
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import multiturn  # benchmarks/ is on sys.path when run as a script
import serving
from machine import cpu_name

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "kv-compression.md"
BEGIN, END = "<!-- kv-tiers: begin -->", "<!-- kv-tiers: end -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["model", "int8"])
    ap.add_argument("--repeats", type=int, default=2, help="runs per format, the formats taking turns")
    ap.add_argument("--no-vllm", action="store_true", help="strata's formats only")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    run = argparse.Namespace(sessions=8, turns=6, think=8.0, max_num_seqs=4, max_tokens=32, kv_cache_gb=0.15,
                             dram_kv_gb=0.1, ssd_kv_gb=4.0)
    texts = multiturn.conversations(run.sessions, run.turns, (700, 900), (20, 80))
    rows = ["| tier format | bytes per token | sessions per GiB of DRAM | turns 2+ from hbm / dram / ssd / none "
            "| median TTFT turns 2+ | p90 TTFT turns 2+ | whole run |", "|---|---:|---:|---|---:|---:|---:|"]
    runs: dict[str, list[multiturn.ModeResult]] = {fmt: [] for fmt in args.formats}
    for r in range(args.repeats):
        for fmt in args.formats:
            run.extra_flags = ["--kv-tier-dtype", fmt]
            multiturn.log(f"tier format {fmt}, run {r + 1}/{args.repeats}")
            runs[fmt].append(multiturn.run_mode("scheduler", run, texts))
    for fmt, results in runs.items():
        later = [t for res in results for t in res.turns if t.turn >= 2]
        tiers = Counter(t.tier for t in later)
        per_token = next(v for k, v in results[0].final.items() if k.startswith("strata_kv_tier_bytes_per_token"))
        session_tokens = statistics.mean(max(t.prompt_tokens for t in results[0].turns if t.session == s)
                                         for s in range(run.sessions))
        rows.append(f"| {fmt} | {per_token:,.0f} | {2**30 / (per_token * session_tokens):.1f} | "
                    + " / ".join(str(tiers[k]) for k in ("hbm", "dram", "ssd", "none"))
                    + f" | {multiturn.ms(multiturn.median(later))} | {multiturn.ms(multiturn.p90(later))} | "
                    + " / ".join(f"{res.wall:.0f}" for res in results) + " s |")
    print("\n".join(rows), flush=True)
    if not args.no_vllm:
        rows.append(vllm_row(run, texts))
        print("\n".join(rows), flush=True)
    body = "\n".join(rows)
    if not args.no_doc:
        text = DOC.read_text()
        shown = " ".join(sys.argv[1:] if argv is None else argv)
        section = (f"{BEGIN}\n## Tiers under pressure\n\n`python benchmarks/kv_tiers.py {shown}` "
                   f"(`make bench-kv-tiers`) on {cpu_name()}, {time.strftime('%Y-%m-%d')}, SmolLM2-135M in "
                   f"float32. {__doc__.split(chr(10) + chr(10))[1].strip()}\n\n{body}\n{END}")
        if BEGIN in text:
            text = text.split(BEGIN)[0] + section + text.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        DOC.write_text(text)
    return 0


def vllm_row(run: argparse.Namespace, texts: list[list[str]]) -> str:
    """vLLM's CPU build on the same conversations, its device pool as many tokens as strata's (one run: its
    turns 2+ count as reused when its prefix cache gave more than half of the prompt)."""
    serving.ensure_vllm_venv()
    m = serving.model()
    pool_tokens = int(run.kv_cache_gb * 2**30 / serving.kv_bytes_per_token(m.directory, 4))
    pool_tokens -= pool_tokens % serving.VLLM_BLOCK
    multiturn.log(f"vLLM: device pool of {pool_tokens} tokens")
    server = serving.ServerProc(serving.Contender("vllm", "vllm", "DTYPE"), m, "tight", "float32",
                                serving.RESULTS / "logs" / "vllm-kv-tiers.log",
                                # vLLM refuses a context longer than its pool (one block kept back)
                                ["--max-num-seqs", str(run.max_num_seqs), "--max-model-len",
                                 str(pool_tokens - serving.VLLM_BLOCK)], pool_tokens)
    try:
        res = serving.drive_multiturn(f"{server.url}/v1", serving.NAME, texts, run.think, run.max_tokens, "vllm",
                                      multiturn.log)
    finally:
        server.stop()
    later = [t for t in res.turns if t.turn >= 2]
    hits = sum(t.cached_tokens > t.prompt_tokens / 2 for t in later)
    return (f"| vLLM (model dtype, device pool only) | {serving.kv_bytes_per_token(m.directory, 4):,} | - | "
            f"{hits} / - / - / {len(later) - hits} | {multiturn.ms(multiturn.median(later))} | "
            f"{multiturn.ms(multiturn.p90(later))} | {res.wall:.0f} s |")


if __name__ == "__main__":
    raise SystemExit(main())
