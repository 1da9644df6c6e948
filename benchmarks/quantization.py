"""Quality of `--quantization int8|int4` against the float32 model, with llama.cpp's Q8_0/Q4_1 of the same model
as the yardstick, and the speed of the quantized kernel against float32 oneDNN at each batch size.

Run: `make bench-quant` or `python benchmarks/quantization.py [--quick]`. Writes docs/quantization.md.

strata, each mode loaded as the server loads it (the default model's GGUF; int4 takes its Q4_1 blocks as stored,
int8 requantizes them and takes the Q8_0 embedding/LM head as stored), against strata float32 (`none`):
- chat: 16 fixed chat prompts rendered with the model's chat template; float32 continues each greedily for 128
  tokens (end of sequence ignored). Greedy agreement: each mode's own greedy continuation against float32's
  (prompts identical over all 128 tokens, median leading tokens equal). Chat KL: mean KL(P_float32 || P_mode)
  of the next-token distributions at the 128 positions of float32's continuation (teacher-forced).
- held-out text: 8 texts of 512 tokens of the held-out Python documentation (strata.engine.skip.corpus); mean
  KL and perplexity over the second half of each text, the positions llama-perplexity scores with -c 512.
The quantized kernel computes every row alike (activations quantized to int8 per block), prompt or generated
token (strata.engine.weights.quality).

llama.cpp (built by benchmarks/llama_cpp_env.sh), each file against an F32 GGUF of the same weights
(`llama-quantize --allow-requantize` of the shipped Q4_1 file; Q8_0 is quantized from that F32):
- held-out text: `llama-perplexity -c 512 --kl-divergence` on the same texts (PPL and mean KLD);
- greedy agreement: llama-server /completion with the same prompt token ids, temperature 0, 128 tokens,
  ignore_eos, each file against the F32 file's continuation. (Chat KL needs full distributions, which the
  server does not return: not measured for llama.cpp.)

Kernel speed: the model's linear layers (30 layers' q/k/v, o, gate/up, down, 106M weights) at 1..512 rows:
float32 through oneDNN (prepacked, what `none` runs), strata's int8/int4 kernel, and PyTorch's own weight-only
kernels (`torch._weight_int8pack_mm` per channel, `torch._weight_int4pack_mm_for_cpu` in groups of 32: what
torchao's CPU configs run; up to 16 rows, slower by far here), median of repeats; weight bytes read per
second for decode sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from machine import cpu_name  # benchmarks/ is on sys.path when run as a script

from strata.engine.models.llama import LlamaModel
from strata.engine.skip.corpus import describe, python_docs_texts
from strata.engine.tokenizer import Tokenizer
from strata.engine.weights import quality
from strata.engine.weights.model_files import resolve_model
from strata.kernels import ops, quantized

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "quantization.md"
BENCH = REPO / ".bench" / "quant"
LLAMA_BIN = REPO / ".bench" / "llama.cpp" / "build" / "bin"
MODES = ("none", "int8", "int4")
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for better sleep.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Translate 'good morning' into Spanish and German.",
    "Summarize the plot of Romeo and Juliet.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "What is a prime number? Give two examples.",
    "How does a bicycle stay upright?",
    "Write a short thank-you note to a teacher.",
    "What are the main ingredients of pancakes?",
)


def log(msg: str) -> None:
    print(f"[quant {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- strata quality


def chat_prompt_ids(tok: Tokenizer, n: int) -> list[list[int]]:
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT_PROMPTS[:n]]


def strata_quality(files, prompts: list[list[int]], texts: list[list[int]], new_tokens: int) -> dict:
    results: dict = {}
    ref_model = LlamaModel.load(files.directory, torch.float32)
    log("float32: greedy continuations and log-probabilities (the reference)")
    ref_greedy = [quality.greedy(ref_model, p, new_tokens) for p in prompts]
    ref_chat = [quality.log_probs(ref_model, p + g)[len(p) - 1 : -1] for p, g in zip(prompts, ref_greedy, strict=True)]
    ref_text = [quality.log_probs(ref_model, t) for t in texts]
    results["none"] = {"weight_mb": ref_model.weight_bytes_per_token / 1e6}
    del ref_model
    for mode in MODES[1:]:
        t0 = time.perf_counter()
        model = LlamaModel.load(files.directory, torch.float32, quantization=mode, gguf=files.gguf)
        log(f"{mode}: loaded in {time.perf_counter() - t0:.1f} s; chat prompts")
        agree = [quality.leading_agreement(quality.greedy(model, p, new_tokens), g)
                 for p, g in zip(prompts, ref_greedy, strict=True)]
        chat = quality.Scores()
        for p, g, ref in zip(prompts, ref_greedy, ref_chat, strict=True):
            chat.add(ref, quality.log_probs(model, p + g)[len(p) - 1 : -1], g)
        log(f"{mode}: held-out text")
        text = quality.Scores()
        for t, ref in zip(texts, ref_text, strict=True):
            half = len(t) // 2  # the rows predicting t[half:]
            text.add(ref[half - 1 : -1], quality.log_probs(model, t)[half - 1 : -1], t[half:])
        results[mode] = {
            "identical": sum(a == new_tokens for a in agree), "median_agree": statistics.median(agree),
            "min_agree": min(agree), "chat_kl": chat.mean_kl, "text_kl": text.mean_kl,
            "same_top": text.same_top_share,
            "ppl": text.perplexity, "ppl_ref": text.perplexity_ref,
            "weight_mb": model.weight_bytes_per_token / 1e6,
        }
        log(f"{mode}: {results[mode]}")
        del model
    return results


# ---------------------------------------------------------------- llama.cpp yardstick


def llama_files(gguf: Path) -> dict[str, Path]:
    BENCH.mkdir(parents=True, exist_ok=True)
    f32, q8 = BENCH / "f32.gguf", BENCH / "q8_0.gguf"
    quantize = str(LLAMA_BIN / "llama-quantize")
    if not f32.exists():
        subprocess.run([quantize, "--allow-requantize", str(gguf), str(f32), "F32"], check=True,
                       capture_output=True)
    if not q8.exists():
        subprocess.run([quantize, str(f32), str(q8), "Q8_0"], check=True, capture_output=True)
    return {"F32": f32, "Q8_0": q8, "Q4_1": gguf}


def llama_perplexity(files: dict[str, Path], text_file: Path) -> dict[str, dict]:
    exe = str(LLAMA_BIN / "llama-perplexity")
    base = BENCH / "f32.kld"
    threads = str(os.cpu_count() or 1)
    subprocess.run([exe, "-m", str(files["F32"]), "-f", str(text_file), "-c", "512", "-t", threads,
                    "--kl-divergence-base", str(base)], check=True, capture_output=True)
    out = {}
    for name in ("Q8_0", "Q4_1"):
        res = subprocess.run([exe, "-m", str(files[name]), "-f", str(text_file), "-c", "512", "-t", threads,
                              "--kl-divergence-base", str(base), "--kl-divergence"], check=True,
                             capture_output=True, text=True)
        text = res.stdout + res.stderr
        out[name] = {"ppl": _stat(text, "Mean PPL(Q)"), "ppl_ref": _stat(text, "Mean PPL(base)"),
                     "text_kl": _stat(text, "Mean    KLD"), "same_top": _stat(text, "Same top p") / 100}
        log(f"llama.cpp {name}: {out[name]}")
    return out


def _stat(text: str, label: str) -> float:
    """A summary figure of llama-perplexity ("label: value ± error"; a table header may hold the label too)."""
    if m := re.search(rf"{re.escape(label)}\s*:\s*([-+0-9.eE]+)", text):
        return float(m.group(1))
    raise ValueError(f"llama-perplexity printed no {label!r}")


def llama_greedy(model: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(LLAMA_BIN / "llama-server"), "-m", str(model), "--port", str(port), "-np", "1",
                             "-c", "2048", "-t", str(os.cpu_count() or 1)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        outs = []
        for p in prompts:
            r = httpx.post(f"{url}/completion", timeout=600, json={
                "prompt": p, "n_predict": new_tokens, "temperature": 0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True})
            r.raise_for_status()
            outs.append(r.json()["tokens"])
        return outs
    finally:
        proc.terminate()
        proc.wait(30)


def llama_quality(gguf: Path, prompts: list[list[int]], texts_file: Path, new_tokens: int) -> dict:
    files = llama_files(gguf)
    out = llama_perplexity(files, texts_file)
    ref = llama_greedy(files["F32"], prompts, new_tokens)
    for name in ("Q8_0", "Q4_1"):
        agree = [quality.leading_agreement(g, r) for g, r in zip(llama_greedy(files[name], prompts, new_tokens),
                                                                ref, strict=True)]
        out[name].update({"identical": sum(a == new_tokens for a in agree),
                          "median_agree": statistics.median(agree), "min_agree": min(agree),
                          "weight_mb": files[name].stat().st_size / 1e6})
        log(f"llama.cpp {name} greedy: median {out[name]['median_agree']}")
    return out


# ---------------------------------------------------------------- kernel speed


TORCH_INT8 = "torch int8"
TORCH_INT4 = "torch int4"
TORCH_INT4_GROUP = 32
TORCH_MAX_ROWS = 16


def _torch_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8 for torch._weight_int8pack_mm: (weights [N, K] int8, scales [N])."""
    scale = w.abs().amax(1).clamp(min=1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def _torch_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 for torch._weight_int4pack_mm_for_cpu: (packed, scales and zeros [K/g, N, 2])."""
    n, k = w.shape
    groups = w.view(n, k // TORCH_INT4_GROUP, TORCH_INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low).clamp(min=1e-8) / 15
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    zero = low + 8 * scale  # its dequantization is (q - 8) * scale + zero
    return (torch._convert_weight_to_int4pack_for_cpu(q, 2),
            torch.stack([scale, zero], -1).transpose(0, 1).contiguous())


def kernel_speed(rows_list: list[int], repeats: int) -> list[dict]:
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # the default model's q/k/v, o, gate/up, down
    gen = torch.Generator().manual_seed(0)
    floats = [[torch.randn(n, k, generator=gen) * 0.05 for n, k in shapes] for _ in range(30)]
    weights = {"float32 (oneDNN)": [[torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in layer]
                                    for layer in floats]}
    for fmt in quantized.FORMATS:
        weights[fmt] = [[ops.pack_quantized(quantized.quantize(w, fmt)) for w in layer] for layer in floats]
    nbytes = {"float32 (oneDNN)": sum(w.numel() * 4 for layer in floats for w in layer)}
    for fmt in quantized.FORMATS:
        nbytes[fmt] = sum(p.data.numel() for layer in weights[fmt] for p in layer)
    # PyTorch's own weight-only kernels (what torchao's CPU configs call), for the choice of kernel.
    weights[TORCH_INT8] = [[_torch_int8(w) for w in layer] for layer in floats]
    weights[TORCH_INT4] = [[_torch_int4(w) for w in layer] for layer in floats]
    for name in (TORCH_INT8, TORCH_INT4):
        nbytes[name] = sum(sum(t.numel() * t.element_size() for t in w) for layer in weights[name] for w in layer)
    macs = sum(n * k for n, k in shapes) * 30
    del floats
    out = []
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=gen) for _, k in shapes}
        row = {"rows": rows}
        for name, layers in weights.items():
            if name in (TORCH_INT8, TORCH_INT4) and rows > TORCH_MAX_ROWS:
                continue  # seconds per pass here: their trend is clear by then
            def run(layers=layers, name=name, xs=xs) -> None:
                for layer in layers:
                    for w, (_, k) in zip(layer, shapes, strict=True):
                        if name.startswith("float32"):
                            torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")
                        elif name == TORCH_INT8:
                            torch._weight_int8pack_mm(xs[k], *w)
                        elif name == TORCH_INT4:
                            torch._weight_int4pack_mm_for_cpu(xs[k], w[0], TORCH_INT4_GROUP, w[1])
                        else:
                            ops.quantized_linear(xs[k], w)
            run()
            times = []
            for _ in range(repeats if rows <= 64 else max(1, repeats // 3)):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            row[name] = {"ms": t * 1e3, "gflops": 2 * macs * rows / t / 1e9, "gbs": nbytes[name] / t / 1e9}
        log(f"kernel rows {rows}: " + ", ".join(f"{k} {v['ms']:.1f} ms" for k, v in row.items() if k != "rows"))
        out.append(row)
    return out


# ---------------------------------------------------------------- report


def write_doc(args: argparse.Namespace, strata: dict, llama: dict | None, speed: list[dict], facts: dict,
              n_prompts: int, n_texts: int, seconds: float) -> None:
    def f(v: float, digits: int = 4) -> str:
        return f"{v:.{digits}f}"

    rows = []
    for mode in MODES[1:]:
        r = strata[mode]
        rows.append(f"| strata {mode} | {r['weight_mb']:.0f} | {r['identical']}/{n_prompts} | "
                    f"{r['median_agree']:g} (min {r['min_agree']}) | {f(r['chat_kl'])} | {f(r['text_kl'])} | "
                    f"{r['same_top']:.1%} | "
                    f"{r['ppl_ref']:.3f} -> {r['ppl']:.3f} ({(r['ppl'] / r['ppl_ref'] - 1) * 100:+.2f}%) |")
    if llama:
        for name in ("Q8_0", "Q4_1"):
            r = llama[name]
            rows.append(f"| llama.cpp {name} | {r['weight_mb']:.0f} (file) | {r['identical']}/{n_prompts} | "
                        f"{r['median_agree']:g} (min {r['min_agree']}) | – | {f(r['text_kl'])} | "
                        f"{r['same_top']:.1%} | "
                        f"{r['ppl_ref']:.3f} -> {r['ppl']:.3f} ({(r['ppl'] / r['ppl_ref'] - 1) * 100:+.2f}%) |")
    names = [k for k in speed[0] if k != "rows"]
    speed_rows = []
    for row in speed:
        cells = [f"{row[n]['ms']:.1f} ms ({row[n]['gflops']:.0f} GFLOP/s, {row[n]['gbs']:.1f} GB/s)" if n in row
                 else "–" for n in names]
        base = row["float32 (oneDNN)"]["ms"]
        ratios = [f"{base / row[n]['ms']:.2f}x" if n in row else "–" for n in names[1:]]
        speed_rows.append(f"| {row['rows']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    text = f"""# Quantized weights: quality and kernel speed

Generated by `benchmarks/quantization.py` (`make bench-quant{' ARGS=--quick' if args.quick else ''}`); its
docstring says exactly what is measured. Machine: {facts['cpu']}, {facts['cores']} cores; torch {torch.__version__};
{datetime.date.today().isoformat()}, {seconds:.0f} s in all.

## Quality against float32

The default model's float32 weights are its GGUF file's Q4_1 blocks (Q8_0 for the embedding) dequantized, so
`int4` from those blocks has float32's very weights and only its activations are quantized (per block of 32, to
int8, inside the kernel); `int8` requantizes the 4-bit values to 8 bits. llama.cpp's rows are each file against
an F32 GGUF of the same weights, measured by llama.cpp's own tools on the same prompts and texts.

| weights | MB read per decode step | greedy: prompts identical over {args.new_tokens} tokens | \
median leading tokens equal | chat KL | held-out KL | held-out same top token | held-out perplexity |
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- {n_prompts} chat prompts (fixed, in benchmarks/quantization.py), rendered with the chat template; {args.new_tokens}
  greedy tokens each, end of sequence ignored. Chat KL: mean KL(float32 || mode) over float32's continuation.
- Held-out text: {n_texts} texts of 512 tokens, {describe('heldout')}; KL, the share of positions where
  both models' most likely next token is the same, and perplexity over each text's second half.
- Greedy decoding follows the first near-tie wherever rounding sends it (this small model has many): a quantized
  model leaves float32's path at some point and continues on another plausible one, as llama.cpp's files do.
- Tolerances held in CI (tests/test_quantization_quality.py, 2 held-out texts and float32's answers to 4 chat
  prompts): mean KL at most 0.01, the same most likely token at 90% of positions or more, perplexity within 1%
  of float32, for both modes.

## Kernel speed (the model's linear layers, one pass over all 30 layers)

| rows | {' | '.join(names)} | {' | '.join(n + ' vs float32' for n in names[1:])} |
|---:|{'---:|' * len(names)}{'---:|' * (len(names) - 1)}
{chr(10).join(speed_rows)}

GFLOP/s counts 2 x rows x weights per pass; GB/s is weight bytes read per second (float32: 4 bytes per weight;
int8: 1.06; int4: 0.625, scales included). Decode steps have one row per running sequence, prefill chunks up to
`--max-num-batched-tokens`; the quantized kernel serves both. strata runs its own kernel only because it
measures faster than PyTorch's at the sizes above (the issue's rule: a library's kernel wherever it pays).

## Decision

The default stays `--quantization none`: the figures above are small but not zero, and a float32 (or
bfloat16) server keeps giving transformers' outputs. `int4` is the choice for CPU decode speed (it reads a
fifth of float32's bytes per step, and llama.cpp's Q4_1 of this model measures as far from float32);
`int8` costs half again int4's bytes with no better quality on this model, whose float weights are
themselves 4-bit.
"""
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 prompts, 2 texts, 32 tokens, fewer kernel sizes")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp's yardstick out")
    args = ap.parse_args(argv)
    n_prompts, n_texts, args.new_tokens = (4, 2, 32) if args.quick else (16, 8, 128)
    rows_list, repeats = ([1, 4, 16, 128], 3) if args.quick else ([1, 2, 4, 8, 16, 32, 64, 128, 512], 7)
    t_start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    files = resolve_model("default")
    tok = Tokenizer(files.directory)
    prompts = chat_prompt_ids(tok, n_prompts)
    texts = python_docs_texts("heldout", tok.encode, n_texts, 512)
    log(f"{len(prompts)} chat prompts, {len(texts)} held-out texts; kernel speed first")
    speed = kernel_speed(rows_list, repeats)
    strata = strata_quality(files, prompts, texts, args.new_tokens)
    llama = None
    if not args.no_llama_cpp:
        subprocess.run(["bash", str(REPO / "benchmarks" / "llama_cpp_env.sh")], check=True)
        BENCH.mkdir(parents=True, exist_ok=True)
        text_file = BENCH / "heldout.txt"
        # Each text decoded on its own and joined: llama-perplexity re-tokenizes and cuts 512-token chunks.
        text_file.write_text("".join(tok.decode(t) for t in texts))
        assert files.gguf is not None
        llama = llama_quality(files.gguf, prompts, text_file, args.new_tokens)
    (BENCH / "results.json").write_text(json.dumps({"strata": strata, "llama.cpp": llama, "speed": speed}, indent=1))
    facts = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    seconds = time.perf_counter() - t_start
    write_doc(args, strata, llama, speed, facts, len(prompts), len(texts), seconds)
    log(f"wrote {DOC.relative_to(REPO)} ({seconds:.0f} s); command: "
        f"{shlex.join(['python', 'benchmarks/quantization.py', *(sys.argv[1:] if argv is None else argv)])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
