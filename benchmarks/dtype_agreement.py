"""How far greedy output in bfloat16 (what `--dtype auto` picks on CPUs with AVX-512 BF16 or AMX, and on GPUs)
follows float32 and transformers.

Run: `make bench-dtype` or `python benchmarks/dtype_agreement.py [--prompts 16] [--new-tokens 64]`.

Prompts are windows of 128 tokens of the stdlib's pydoc text (the corpus of benchmarks/engine.py). Each is
continued greedily for NEW tokens (ignore_eos) by strata in float32, strata in bfloat16 and transformers'
LlamaForCausalLM in float32 on the same weights. For each pair the table gives how many prompts agree on
every token, and the median and smallest number of leading tokens that agree. Greedy decoding amplifies a
rounding difference once two tokens are nearly tied, so bfloat16 agreeing with float32 for a while and then
taking another, equally plausible path is expected; float32 strata against transformers should agree.
Writes the section "## Greedy agreement of dtypes (make bench-dtype)" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from engine import Prompts, corpus_ids  # benchmarks/ is on sys.path when run as a script
from machine import cpu_name

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.request import Request
from strata.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Greedy agreement of dtypes (make bench-dtype)"
PROMPT_TOKENS = 128


def log(msg: str) -> None:
    print(msg, flush=True)


def strata_greedy(dtype: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(dtype=dtype, kv_cache_gb=0.25, session_cache=False))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"p{i}", p, params))
    out: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    engine.close()
    return [out[f"p{i}"] for i in range(len(prompts))]


def transformers_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    transformers.utils.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    for p in prompts:  # one at a time: no padding to differ from strata's unpadded batch
        ids = torch.tensor([p], dtype=torch.long)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    log("strata float32 ...")
    f32 = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.05, session_cache=False))
    source = Prompts(corpus_ids(f32, args.prompts * PROMPT_TOKENS * 2))
    model_dir = f32.files.directory
    f32.close()
    prompts = [source.take(PROMPT_TOKENS) for _ in range(args.prompts)]
    runs = {"strata float32": strata_greedy("float32", prompts, args.new_tokens)}
    log("strata bfloat16 ...")
    runs["strata bfloat16"] = strata_greedy("bfloat16", prompts, args.new_tokens)
    log("transformers float32 ...")
    runs["transformers float32"] = transformers_greedy(model_dir, prompts, args.new_tokens)

    pairs = [("strata float32", "transformers float32"), ("strata bfloat16", "strata float32"),
             ("strata bfloat16", "transformers float32")]
    lines = ["| pair | prompts identical | median leading tokens equal | fewest leading tokens equal |",
             "|---|---:|---:|---:|"]
    for a, b in pairs:
        lead = [leading_agreement(x, y) for x, y in zip(runs[a], runs[b], strict=True)]
        same = sum(n == args.new_tokens for n in lead)
        lines.append(f"| {a} vs {b} | {same}/{len(lead)} | {statistics.median(lead):g} of {args.new_tokens} "
                     f"| {min(lead)} |")
    table = "\n".join(lines)
    print(table)
    if args.no_doc:
        return 0
    body = (f"{table}\n\n"
            f"Command: `python benchmarks/dtype_agreement.py --prompts {args.prompts} --new-tokens "
            f"{args.new_tokens}` (`make bench-dtype`), run {datetime.date.today().isoformat()}, "
            f"{time.monotonic() - t0:.0f} s in all.\n"
            f"Model SmolLM2-135M-Instruct on CPU ({cpu_name()}); torch {torch.__version__}, transformers "
            f"{transformers.__version__}. Prompts: {args.prompts} windows of {PROMPT_TOKENS} tokens of pydoc "
            f"text, each continued greedily for {args.new_tokens} tokens without stopping at EOS.\n"
            "Greedy decoding follows the first near-tie wherever rounding sends it, so a bfloat16 run leaves "
            "float32's path at some point and then continues on another plausible one; the oracle tests stay "
            "in float32, and `--dtype float32` gives float32 on any machine.\n")
    section = f"{SECTION}\n\n{body}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(lambda _: section + "\n", text) if pat.search(text) else text.rstrip() + "\n\n" + section
    DOC.write_text(text)
    log(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
