"""Gemma 3 270M served by strata, llama.cpp's llama-server and vLLM's CPU build, one after the other.

The same weights for all: the shipped `gemma-3-270m-q4_k_m.gguf` (strata `--model gemma-3-270m`, and
llama-server on the file itself) and the Hugging Face directory strata converts it to, its Q4_K_M blocks
dequantized (vLLM). Contenders, each on a fresh server, each at its best on this machine:

- strata at the dtype `--dtype auto` picks here (the weights dequantized), strata `--quantization int8` (the
  file's Q8_0 blocks, the tied embedding and LM head among them, taken as stored; its Q5_0, Q4_K and Q6_K
  weights rounded to int8) and strata `--quantization int4` (its Q4_K blocks taken as stored; the Q5_0, Q6_K
  and Q8_0 ones rounded to int4, the LM head to int8: below the file's precision);
- llama-server on the GGUF (every core, 16 slots so concurrency 16 runs in parallel, prompt cache on);
- vLLM's CPU build at the same dtype as strata, given every core, tcmalloc and Intel OpenMP preloaded, prefix
  caching on (the flags of benchmarks/serving.py).

Workloads:
1. greedy agreement: 8 prompts of 600-900 tokens (beyond the 512-token window of the local layers), 48 tokens
   at temperature 0 through /v1/completions; each contender's tokens against strata's (same prefix length).
2. `vllm bench serve`: random prompts of 512 tokens, 128 output tokens, ignore_eos, at concurrency 1 (8
   requests) and 16 (32 requests): output tok/s.
3. multi-turn through /v1/completions (a base model: no chat template): 4 sessions x 5 turns, a passage of
   900-1100 tokens first, then a new paragraph each turn on top of the whole history, 32 tokens out, with
   X-Session-ID: median TTFT of turns 2+; for strata also the stored KV bytes per session (its DRAM tier over
   its sessions) against what the whole history at every layer would take.

Writes its section of docs/models.md; results under .bench/models/.

    python benchmarks/models.py                       # everything (make bench-models)
    python benchmarks/models.py --contenders strata   # rerun some; the others keep their last results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp  # benchmarks/ is on sys.path when run as a script
import multiturn
import serving
from openai import OpenAI
from server_process import scrape_metrics
from serving import Contender, Model, ServerProc, log

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / ".bench" / "models"
DOC = REPO / "docs" / "models.md"
NAME = "gemma-3-270m"
BEGIN, END = "<!-- bench-models: begin -->", "<!-- bench-models: end -->"
CONTENDERS = {c.name: c for c in (
    Contender("strata", "strata", "DTYPE"),
    Contender("strata-int8", "strata", "int8", quantization="int8"),
    Contender("strata-int4", "strata", "int4", quantization="int4"),
    Contender("llama-q4_k_m", "llama", "Q4_K_M", gguf="Q4_K_M"),
    Contender("vllm", "vllm", "DTYPE"),
)}
LLAMA_SLOTS, LLAMA_CONTEXT = 16, 4096


def gemma() -> Model:
    from strata.engine.weights.model_files import resolve_model

    files = resolve_model(NAME)
    assert files.gguf is not None
    return Model(files.gguf, Path(files.directory), {"Q4_K_M": files.gguf})


def completion(client: OpenAI, prompt: str, max_tokens: int,
               session: str | None = None) -> tuple[float, str, int, int]:
    """One streamed completion: (ttft seconds, text, cached prompt tokens as reported, all tokens)."""
    t0 = time.perf_counter()
    ttft, parts, cached, total = None, [], 0, 0
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_headers={"X-Session-ID": session} if session else None)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            total = chunk.usage.total_tokens
            if chunk.usage.prompt_tokens_details is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
    return (ttft if ttft is not None else time.perf_counter() - t0), "".join(parts), cached, total


def greedy(url: str, prompts: list[str], tokens: int) -> list[str]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    return [completion(client, p, tokens)[1] for p in prompts]


def agreement(ours: list[str], theirs: list[str], directory: Path) -> dict[str, float]:
    """Share of prompts with all tokens equal, and the mean share of leading tokens equal."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    lead = []
    for a, b in zip(ours, theirs, strict=True):
        ta, tb = tok.encode(a, add_special_tokens=False), tok.encode(b, add_special_tokens=False)
        n = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), min(len(ta), len(tb)))
        lead.append(n / max(len(ta), len(tb), 1))
    return {"exact": sum(x == 1.0 for x in lead) / len(lead), "leading": statistics.mean(lead)}


def multi_turn(url: str, texts: list[list[str]], max_tokens: int, label: str) -> dict:
    """Each session's turns in order (sessions in parallel): history + new passage, continued greedily."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    run = f"{label}-{os.getpid()}-{int(time.time())}"
    rows: list[tuple[int, float, int]] = []
    lengths: list[int] = []  # each session's tokens at its end
    lock = threading.Lock()

    def session(s: int) -> None:
        history = ""
        for t, text in enumerate(texts[s], 1):
            history += ("\n\n" if history else "") + text + "\n\n"
            ttft, answer, cached, total = completion(client, history, max_tokens, f"{run}-s{s}")
            history += answer
            with lock:
                rows.append((t, ttft, cached))
                if t == len(texts[s]):
                    lengths.append(total)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(texts)) as pool:
        for f in [pool.submit(session, s) for s in range(len(texts))]:
            f.result()
    later = [r for r in rows if r[0] >= 2]
    return {"wall_s": time.perf_counter() - t0, "median_ttft_later_ms": statistics.median(r[1] for r in later) * 1e3,
            "mean_cached_later": statistics.mean(r[2] for r in later), "mean_tokens": statistics.mean(lengths)}


def stored_bytes(url: str, m: Model, dtype_bytes: int, tokens: float) -> dict[str, float]:
    """strata's DRAM tier per session, and what every layer's whole history (`tokens`) would take."""
    metrics = scrape_metrics(url)
    sessions = metrics.get("strata_kv_sessions", 0.0) or 1.0
    held = metrics.get('strata_kv_occupancy_bytes{tier="dram"}', 0.0)
    cfg = json.loads((m.directory / "config.json").read_text())
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * dtype_bytes
    return {"per_session": held / sessions, "full_per_session": tokens * per_token}


def run_contender(c: Contender, m: Model, dtype: str, args: argparse.Namespace, prompts: list[str],
                  texts: list[list[str]]) -> dict:
    res: dict = {}
    logs = RESULTS / "logs"
    server = ServerProc(c, m, "default", dtype, logs / f"{c.name}.log")
    res["command"] = server.shown()
    try:
        log(f"{c.name}: greedy, {len(prompts)} prompts")
        res["greedy"] = greedy(server.url, prompts, args.greedy_tokens)
        res["bench"] = {}
        for conc, n in ((1, args.prompts_c1), (16, args.prompts_c16)):
            bench_args = argparse.Namespace(input_len=512, output_len=128, num_prompts=n)
            r = serving.run_bench(server, c, m.directory, bench_args, conc)
            res["bench"][f"c{conc}"] = {"output_throughput": r["output_throughput"],
                                        "median_ttft_ms": r["median_ttft_ms"], "command": r["_command"]}
            log(f"{c.name} c={conc}: {r['output_throughput']:.1f} output tok/s")
    finally:
        server.stop()
    # A fresh server for the conversations: nothing cached from the load above.
    server = ServerProc(c, m, "default", dtype, logs / f"{c.name}-multiturn.log")
    try:
        log(f"{c.name}: multi-turn, {len(texts)} sessions x {len(texts[0])} turns")
        res["multiturn"] = multi_turn(server.url, texts, args.turn_tokens, c.name)
        if c.kind == "strata":
            time.sleep(2)  # the last saves reach the DRAM tier
            res["stored"] = stored_bytes(server.url, m, 4 if dtype == "float32" else 2,
                                         res["multiturn"]["mean_tokens"])
        log(f"{c.name}: multi-turn median TTFT turns 2+ {res['multiturn']['median_ttft_later_ms']:.0f} ms")
    finally:
        server.stop()
    return res


def render(results: dict, dtype: str, m: Model) -> str:
    order = [n for n in CONTENDERS if n in results]
    ours = results.get("strata", {}).get("greedy")

    def cell(name: str, path: tuple[str, ...], fmt: str) -> str:
        v: object = results[name]
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None  # type: ignore[union-attr]
        return fmt.format(v) if isinstance(v, int | float) else "-"

    rows = ["| | " + " | ".join(n.replace("DTYPE", dtype) for n in order) + " |",
            "|---|" + "---:|" * len(order)]
    if ours:
        agree = {n: agreement(ours, results[n]["greedy"], m.directory) for n in order if results[n].get("greedy")}
        rows.append("| greedy: prompts with all 48 tokens equal to strata's | "
                    + " | ".join(f"{agree[n]['exact']:.0%}" if n in agree else "-" for n in order) + " |")
        rows.append("| greedy: leading tokens equal to strata's | "
                    + " | ".join(f"{agree[n]['leading']:.0%}" if n in agree else "-" for n in order) + " |")
    rows.append("| output tok/s, concurrency 1 | " + " | ".join(cell(n, ("bench", "c1", "output_throughput"),
                                                                    "{:.1f}") for n in order) + " |")
    rows.append("| output tok/s, concurrency 16 | " + " | ".join(cell(n, ("bench", "c16", "output_throughput"),
                                                                     "{:.1f}") for n in order) + " |")
    rows.append("| multi-turn: median TTFT turns 2+ (ms) | " + " | ".join(
        cell(n, ("multiturn", "median_ttft_later_ms"), "{:.0f}") for n in order) + " |")
    rows.append("| multi-turn: whole run (s) | " + " | ".join(
        cell(n, ("multiturn", "wall_s"), "{:.1f}") for n in order) + " |")
    rows.append("| stored KV per session (KiB) | " + " | ".join(
        f"{results[n]['stored']['per_session'] / 1024:.0f} (whole history: "
        f"{results[n]['stored']['full_per_session'] / 1024:.0f})" if "stored" in results[n] else "-"
        for n in order) + " |")
    commands = "\n".join(f"- {n}: `{_no_local_paths(results[n]['command'])}`" for n in order)
    return "\n".join(rows) + "\n\nServers (PORT a free loopback port):\n\n" + commands + "\n"


def _no_local_paths(text: str) -> str:
    """Commands as anyone would type them: the checkout as `.`, the home directory as `~`."""
    return text.replace(str(REPO) + "/", "").replace(str(Path.home()), "~")


def write_doc(body: str, facts: dict[str, str], argv: list[str]) -> None:
    text = DOC.read_text()
    section = (f"{BEGIN}\n## Benchmark: Gemma 3 270M against llama-server and vLLM\n\n"
               f"`python benchmarks/models.py {' '.join(argv)}` (`make bench-models`) on "
               f"{facts.get('cpu', '?')}, {facts.get('cores', '?')} cores ({facts.get('flags', '')}); "
               f"{time.strftime('%Y-%m-%d')}. Workloads:\n\n"
               f"{__doc__.split('Workloads:')[1].split('Writes')[0].strip()}\n\n"
               f"{body}\n{END}")
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--no-run", action="store_true", help="redraw the table and doc from the last results")
    args = ap.parse_args(argv)
    args.greedy_tokens, args.turn_tokens, args.prompts_c1, args.prompts_c16 = 48, 32, 8, 32
    argv_shown = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--no-run"]
    serving.NAME = NAME  # the served model name every launch and load generator uses
    RESULTS.mkdir(parents=True, exist_ok=True)
    serving.RESULTS = RESULTS
    if not args.no_run:
        serving.ensure_vllm_venv()
    if not args.no_run and any(CONTENDERS[n].kind == "llama" for n in args.contenders):
        llama_cpp.ensure_built()
        llama_cpp.server_cmd = _llama_cmd(llama_cpp.server_cmd)
    m = gemma()
    dtype = serving.strata_dtype()
    texts = multiturn.conversations(4, 5, (900, 1100), (60, 120))
    prompts = [s[0] + "\n\n" + s[1] for s in multiturn.conversations(8, 2, (600, 800), (60, 120))]
    summary = RESULTS / "summary.json"
    results = json.loads(summary.read_text()) if summary.exists() else {}
    for name in [] if args.no_run else args.contenders:
        results[name] = run_contender(CONTENDERS[name], m, dtype, args, prompts, texts)
        summary.write_text(json.dumps(results, indent=1))
    body = render(results, dtype, m)
    print(body)
    if not args.no_doc:
        write_doc(body, serving.machine_facts(), argv_shown)
        log(f"wrote {DOC.relative_to(REPO)}")
    return 0


def _llama_cmd(plain):  # type: ignore[no-untyped-def]
    """llama-server with 16 slots of 4096 tokens (concurrency 16 in parallel, the conversations fit a slot)."""
    def cmd(model: Path, port: int, slots: int = LLAMA_SLOTS, context: int = LLAMA_CONTEXT) -> list[str]:
        return plain(model, port, slots=LLAMA_SLOTS, context=LLAMA_CONTEXT)
    return cmd


if __name__ == "__main__":
    raise SystemExit(main())
