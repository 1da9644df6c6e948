"""strata's engine against Hugging Face transformers: same weights, same dtype (float32), same CPU threads.

Run: `make bench-engine` or `python benchmarks/engine.py [--quick]`.

Workloads (both contenders get exactly the same token ids):
- prefill: one request of N prompt tokens, time to the first generated token. transformers runs
  `generate(max_new_tokens=1)` (one forward that keeps only the last position's logits, as strata does).
- decode: B requests of equal-length prompts, greedy, NEW_TOKENS tokens each without stopping at EOS.
  Decode-only throughput = tokens generated after prefill / (end time - time when the last sequence got
  its first token); i.e. the prefill part is subtracted by timestamps taken inside the generation loop
  (strata: after each `step()`, transformers: a streamer that is called once per generated token).

Each measurement is repeated (after one warm-up), contenders interleaved, and the median is reported.
Interleaving keeps the comparison fair when something else competes for the CPU.
The Markdown table is printed and written to docs/benchmarks.md, section "## Engine (make bench-engine)".
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import pydoc
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from machine import cpu_name  # benchmarks/ is on sys.path when run as a script
from transformers.generation.streamers import BaseStreamer

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.request import Request
from strata.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Engine (make bench-engine)"

PREFILL_LENS = (512, 2048)
DECODE_BATCHES = (1, 4, 16)
DECODE_PROMPT_LEN = 128
NEW_TOKENS = 64
DEFAULT_BUDGET = EngineConfig().max_num_batched_tokens
# Stdlib modules whose pydoc text is the prompt corpus: real English prose with some code in it.
CORPUS_MODULES = ("argparse", "logging", "collections", "json", "pathlib", "functools", "itertools",
                  "subprocess", "threading", "datetime", "re", "csv", "textwrap", "string")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- CPU contention
# The machine may be shared: another process on the same cores skews a run badly (OpenMP threads spin
# and get descheduled). So before each run wait (bounded) until the CPUs are quiet, and measure how much
# CPU other processes used during the run, to report it instead of hiding it.


def _busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (Linux), None where /proc/stat is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    vals = [int(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    busy = sum(vals[:8]) - idle  # user..steal; guest time is already inside user
    return busy / os.sysconf("SC_CLK_TCK")


class Contention:
    """Share of the machine's CPU used by other processes during a span (0 = none, 1 = all cores)."""

    def __init__(self) -> None:
        self.busy0, self.own0, self.wall0 = _busy_seconds(), time.process_time(), time.perf_counter()

    def others(self) -> float:
        busy = _busy_seconds()
        if busy is None or self.busy0 is None:
            return 0.0
        wall = time.perf_counter() - self.wall0
        other = (busy - self.busy0) - (time.process_time() - self.own0)
        return max(0.0, other / (wall * (os.cpu_count() or 1)))


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait until other processes use under `threshold` of the CPUs for a second; returns seconds waited."""
    t0 = time.perf_counter()
    announced = False
    while time.perf_counter() - t0 < max_wait:
        c = Contention()
        time.sleep(1.0)
        load = c.others()
        if load < threshold:
            break
        if not announced:
            log(f"  (other processes use {load:.0%} of the CPUs: waiting up to {max_wait:.0f} s)")
            announced = True
    return time.perf_counter() - t0


def corpus_ids(engine: LLMEngine, min_tokens: int) -> list[int]:
    import importlib

    ids: list[int] = []
    for name in CORPUS_MODULES:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        ids += engine.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= min_tokens:
            break
    if len(ids) < min_tokens:
        raise RuntimeError(f"prompt corpus too small: {len(ids)} < {min_tokens} tokens")
    return ids


class Prompts:
    """Windows of exactly n tokens from the corpus; every call gets a fresh window so nothing is reused."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.pos = 0

    def take(self, n: int) -> list[int]:
        if self.pos + n > len(self.ids):
            self.pos = (self.pos + 97) % max(1, len(self.ids) - n)  # wrap around, shifted
        out = self.ids[self.pos : self.pos + n]
        self.pos += n
        return out


# ---------------------------------------------------------------- strata


class StrataRunner:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.n = 0

    def _add(self, prompt: list[int], max_tokens: int) -> str:
        self.n += 1
        rid = f"bench-{self.n}"
        self.engine.add_request(
            Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        )
        return rid

    def prefill(self, prompt: list[int]) -> float:
        """Seconds from adding the request to its first token."""
        t0 = time.perf_counter()
        self._add(prompt, max_tokens=1)
        while self.engine.has_work():
            if any(o.new_token_ids for o in self.engine.step()):
                break
        dt = time.perf_counter() - t0
        while self.engine.has_work():  # nothing should be left, but never leak into the next run
            self.engine.step()
        return dt

    def decode(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """Decode-only tokens/s (after every sequence has its first token) and the generated ids."""
        rids = [self._add(p, new_tokens) for p in prompts]
        outs: dict[str, list[int]] = {r: [] for r in rids}
        started: set[str] = set()
        t_first = None
        after_first = 0
        while self.engine.has_work():
            step_outs = self.engine.step()
            now = time.perf_counter()
            for o in step_outs:
                outs[o.request_id] += o.new_token_ids
                if t_first is not None:
                    after_first += len(o.new_token_ids)
                elif o.new_token_ids:
                    started.add(o.request_id)
            if t_first is None and len(started) == len(rids):
                t_first = now  # prefill of the whole batch done: decode timing starts here
            t_end = now
        assert t_first is not None
        return after_first / (t_end - t_first), [outs[r] for r in rids]


# ---------------------------------------------------------------- transformers


class TokenTimes(BaseStreamer):
    """A generate() streamer: put() is called with the prompt, then once per generated token (batched)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(value)

    def end(self) -> None:
        pass


class HFRunner:
    def __init__(self, model_dir: Path) -> None:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.pad = self.model.config.eos_token_id
        if isinstance(self.pad, list):
            self.pad = self.pad[0]

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> TokenTimes:
        ids = torch.tensor(prompts, dtype=torch.long)
        streamer = TokenTimes()
        self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # never stop early at EOS (strata: ignore_eos)
            do_sample=False,
            pad_token_id=self.pad,
            streamer=streamer,
        )
        return streamer

    def prefill(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        self._generate([prompt], 1)
        return time.perf_counter() - t0

    def decode(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        s = self._generate(prompts, new_tokens)
        # times[0]: the prompt (before prefill); times[1]: first generated token; times[-1]: the last one.
        gen = torch.stack([t.reshape(-1) for t in s.tokens[1:]], dim=1)  # [batch, new tokens]
        after_first = len(prompts) * (len(s.tokens) - 2)
        return after_first / (s.times[-1] - s.times[1]), gen.tolist()


# ---------------------------------------------------------------- measuring


@dataclass
class Row:
    workload: str
    strata: float  # tokens/s
    hf: float | None  # tokens/s; None: not measured for transformers

    @property
    def ratio(self) -> float | None:
        return None if self.hf is None else self.strata / self.hf


CONTENTION: list[float] = []  # other processes' CPU share during each measured run
MAX_WAIT = 60.0  # seconds to wait for a quiet machine before each run (set from --max-wait)


def measure(
    label: str, reps: int, contenders: dict[str, Callable[[int], float]]
) -> dict[str, float]:
    """Warm-up once, then `reps` interleaved runs of each contender; median tokens/s per contender."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(reps + 1):
        for name, fn in contenders.items():
            if rep > 0:
                wait_quiet(MAX_WAIT)
            c = Contention()
            tps = fn(rep)
            others = c.others()
            tag = "warm-up" if rep == 0 else f"run {rep}/{reps}"
            note = f"  (other processes used {others:.0%} of the CPUs)" if others >= 0.05 else ""
            log(f"  {label:<42} {name:<12} {tag:<9} {tps:9.1f} tok/s{note}")
            if rep > 0:
                results[name].append(tps)
                CONTENTION.append(others)
    return {name: statistics.median(v) for name, v in results.items()}


def fmt(v: float | None, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:,.1f}{unit}"


def render(rows: list[Row], strata_scaling: float, goals: list[str], meta: list[str]) -> str:
    lines = ["| workload | strata tok/s | transformers tok/s | strata/transformers |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.workload} | {fmt(r.strata)} | {fmt(r.hf)} | {ratio} |")
    lines += ["", f"strata decode batch 16 / batch 1: **{strata_scaling:.2f}x**", ""]
    lines += [f"- {g}" for g in goals]
    lines += ["", *meta]
    return "\n".join(lines) + "\n"


def write_doc(body: str) -> None:
    section = f"{SECTION}\n\n{body}"
    if DOC.exists():
        text = DOC.read_text()
        # Replace from our heading up to the next "## " heading (or the end); other sections stay as they are.
        pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
        if pat.search(text):
            text = pat.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = "# Benchmarks\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> None:
    global MAX_WAIT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 measured run per workload instead of 3")
    ap.add_argument("--reps", type=int, default=None, help="measured runs per workload (default 3, --quick 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for both")
    ap.add_argument("--max-wait", type=float, default=MAX_WAIT,
                    help="seconds to wait for other processes to leave the CPUs before each run")
    ap.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.relative_to(REPO)}")
    args = ap.parse_args()
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    MAX_WAIT = args.max_wait

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    # One process, so both contenders share this setting (and the same intra-op thread pool).
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    log(f"loading strata (budgets {DEFAULT_BUDGET} and 2048) and transformers, {args.threads} threads ...")
    engines = {DEFAULT_BUDGET: LLMEngine(EngineConfig(dtype="float32"))}
    if DEFAULT_BUDGET != 2048:
        engines[2048] = LLMEngine(EngineConfig(dtype="float32", max_num_batched_tokens=2048))
    base = engines[DEFAULT_BUDGET]
    hf = HFRunner(base.files.directory)
    strata = {b: StrataRunner(e) for b, e in engines.items()}
    prompts = Prompts(corpus_ids(base, 60_000))
    log(f"model {base.files.name}, prompt corpus {len(prompts.ids)} tokens (pydoc of the stdlib)")

    rows: list[Row] = []
    prefill_rows: dict[int, Row] = {}  # budget -> the row of the longest prompt
    # ---- prefill: same prompt for both contenders within one repetition, a new one per repetition.
    prefill_cases = [(n, DEFAULT_BUDGET) for n in PREFILL_LENS]
    if DEFAULT_BUDGET < max(PREFILL_LENS):
        prefill_cases.append((max(PREFILL_LENS), 2048))
    for n, budget in prefill_cases:
        chunks = -(-n // budget)
        label = f"prefill {n} tok (budget {budget}, {chunks} chunk{'s' if chunks > 1 else ''})"
        cases = {rep: prompts.take(n) for rep in range(reps + 1)}
        runner = strata[budget]
        med = measure(label, reps, {
            "strata": lambda rep, r=runner, c=cases, n=n: n / r.prefill(c[rep]),
            "transformers": lambda rep, c=cases, n=n: n / hf.prefill(c[rep]),
        })
        rows.append(Row(label, med["strata"], med["transformers"]))
        if n == max(PREFILL_LENS):
            prefill_rows[budget] = rows[-1]

    # ---- decode
    decode: dict[int, float] = {}
    agree: tuple[int, int] | None = None
    for b in DECODE_BATCHES:
        label = f"decode batch {b} ({DECODE_PROMPT_LEN}-tok prompts, {NEW_TOKENS} new)"
        cases = {rep: [prompts.take(DECODE_PROMPT_LEN) for _ in range(b)] for rep in range(reps + 1)}
        generated: dict[str, list[list[int]]] = {}

        def run(name: str, fn: Callable[[list[list[int]], int], tuple[float, list[list[int]]]],
                rep: int, c: dict[int, list[list[int]]] = cases,
                g: dict[str, list[list[int]]] = generated) -> float:
            tps, ids = fn(c[rep], NEW_TOKENS)
            if rep == 0:
                g[name] = ids
            return tps

        med = measure(label, reps, {
            "strata": lambda rep, run=run: run("strata", strata[DEFAULT_BUDGET].decode, rep),
            "transformers": lambda rep, run=run: run("transformers", hf.decode, rep),
        })
        decode[b] = med["strata"]
        rows.append(Row(label, med["strata"], med["transformers"]))
        if b == 1:
            # Sanity check: both run the same weights greedily, so the texts should agree for a good while
            # (float32 rounding differs between implementations and can flip a near-tie later on).
            s, h = generated["strata"][0], generated["transformers"][0]
            same = next((i for i, (x, y) in enumerate(zip(s, h, strict=False)) if x != y), min(len(s), len(h)))
            agree = (same, len(s))

    scaling = decode[16] / decode[1]
    p_default, p_2048 = prefill_rows[DEFAULT_BUDGET], prefill_rows[2048]

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    goals = [
        f"Goal: strata prefill of {max(PREFILL_LENS)} tokens at least as fast as transformers: "
        f"{verdict((p_default.ratio or 0) >= 1.0)} with the default budget ({DEFAULT_BUDGET}; "
        f"{p_default.ratio:.2f}x), {verdict((p_2048.ratio or 0) >= 1.0)} with budget 2048 ({p_2048.ratio:.2f}x)",
        f"Goal: strata decode batch 16 at least 4x its batch 1: {verdict(scaling >= 4.0)} ({scaling:.2f}x)",
    ]
    if agree is not None:
        goals.append(f"Sanity: greedy batch-1 output of strata and transformers agrees on the first "
                     f"{agree[0]} of {agree[1]} tokens")
    cmd = " ".join(["python", "benchmarks/engine.py", *sys.argv[1:]])
    meta = [
        f"Command: `{cmd}` (`make bench-engine`), run {datetime.date.today().isoformat()}, "
        f"{time.perf_counter() - t_start:.0f} s in all.",
        f"Model {base.files.name}, float32, CPU; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{os.cpu_count()} cores ({cpu_name()}), torch threads {args.threads} for both.",
        f"strata: `EngineConfig()` defaults (max_num_batched_tokens {DEFAULT_BUDGET}) unless a row says budget "
        "2048. transformers: `LlamaForCausalLM`, default attention, `generate(do_sample=False)`.",
        "Prefill tok/s = prompt tokens / time to the first token (transformers: `generate(max_new_tokens=1)`). "
        f"Decode tok/s = tokens generated after every sequence has its first token / the time after that "
        f"(prefill subtracted by timestamps inside the generation loop). Median of {reps} runs after a "
        "warm-up, contenders interleaved; prompts are token windows of the stdlib's pydoc text.",
        f"Other processes' CPU use during the measured runs: median {statistics.median(CONTENTION):.0%}, "
        f"max {max(CONTENTION):.0%} of the machine (0% = the benchmark had the CPUs to itself).",
    ]
    body = render(rows, scaling, goals, meta)
    log("\n" + body)
    if not args.no_doc:
        write_doc(body)
        log(f"written to {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
