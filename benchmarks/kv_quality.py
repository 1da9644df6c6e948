"""The quality gate of --kv-tier-dtype: what a later turn loses when its history comes back from a compressed tier.

For each model and each conversation (multi-turn, greedy answers of the model itself), the history's KV is
computed, sent through a tier format (encoded and decoded as the saver and loader do: strata/storage/kv_codec.py),
and the next turn runs on top of it (its own tokens computed exactly, as in serving). Against the same turn on
the uncompressed history:

- greedy agreement: the share of 128 greedy tokens of the next turn equal to the uncompressed ones up to the
  first difference (mean over conversations), and the share of conversations with all 128 equal;
- mean KL(P_model-dtype || P_format) of the next-token distributions along the uncompressed greedy
  continuation (teacher-forced);
- perplexity of a held-out passage read after the history;
- bytes of one token's KV over all layers in the tiers (and against bfloat16, what GPUs and AMX/AVX-512 BF16
  machines store).

Gate: a format may be the default if its mean KL <= 0.002 and its greedy agreement >= 95%. Writes
docs/kv-compression.md.

    python benchmarks/kv_quality.py                    # SmolLM2 and Gemma 3 270M (make bench-kv-quality)
    python benchmarks/kv_quality.py --models default   # one model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import multiturn  # benchmarks/ is on sys.path when run as a script
import torch
from machine import cpu_name

from strata.engine.models.llama import LlamaModel
from strata.engine.skip.sequence_runner import SequenceRunner
from strata.engine.tokenizer import Tokenizer
from strata.engine.weights.model_files import resolve_model
from strata.storage.kv_codec import FORMATS, KVCodec

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "kv-compression.md"
NEW_TOKENS, ANSWER_TOKENS, CHUNK = 128, 48, 256
KL_GATE, AGREEMENT_GATE = 0.002, 0.95


def log(msg: str) -> None:
    print(f"[kv-quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Result:
    agreement: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)  # per held-out token


def prefill(runner: SequenceRunner, ids: list[int], logits_from: int | None = None) -> torch.Tensor:
    """Append ids in chunks; the logits of rows logits_from.. of these ids (default: the last)."""
    out = []
    for start in range(0, len(ids), CHUNK):
        part = ids[start:start + CHUNK]
        first = None if logits_from is None else max(0, logits_from - start)
        if logits_from is not None and first is not None and first >= len(part):
            runner.prefill(part)
            continue
        logits, _ = runner.prefill(part, logits_from=first)
        out.append(logits)
    return torch.cat(out) if logits_from is not None else out[-1]


def greedy(runner: SequenceRunner, prompt: list[int], n: int) -> list[int]:
    tokens = [int(prefill(runner, prompt)[-1].argmax())]
    while len(tokens) < n:
        tokens.append(int(runner.decode(tokens[-1])[0].argmax()))
    return tokens


def conversations(name: str, tok: Tokenizer, model: LlamaModel, count: int) -> list[tuple[list[int], list[int]]]:
    """(history, next turn's prompt) per conversation: two turns answered greedily by the model, then a third."""
    texts = multiturn.conversations(count, 3, (500, 700), (40, 90))
    chat = tok.has_chat_template
    out = []
    for turns in texts:
        runner = SequenceRunner(model, 4096)
        messages: list[dict[str, str]] = []
        history: list[int] = []
        for text in turns[:2]:
            messages.append({"role": "user", "content": text})
            prompt = tok.encode_chat(messages) if chat else history + tok.encode(text + "\n\n", add_special_tokens=
                                                                                  not history)
            runner.reset()
            answer = greedy(runner, prompt, ANSWER_TOKENS)
            messages.append({"role": "assistant", "content": tok.decode(answer)})
            history = prompt + answer
        messages.append({"role": "user", "content": turns[2]})
        following = (tok.encode_chat(messages) if chat
                     else history + tok.encode("\n\n" + turns[2] + "\n\n", add_special_tokens=False))
        # The stored history is what the chat template renders identically in the next prompt.
        common = next((i for i, (a, b) in enumerate(zip(history, following, strict=False)) if a != b),
                      min(len(history), len(following)))
        out.append((following[:common], following[common:]))
    return out


def evaluate(model: LlamaModel, fmt: str, history: list[int], prompt: list[int], held_out: list[int],
             exact: tuple[list[int], torch.Tensor] | None) -> tuple[list[int], torch.Tensor, float]:
    """The next turn on the history sent through `fmt`: (greedy tokens, log-probs along the uncompressed
    continuation, mean NLL of the held-out passage)."""
    cfg = model.cfg
    runner = SequenceRunner(model, len(history) + len(prompt) + NEW_TOKENS + len(held_out) + 16)
    prefill(runner, history)
    codec = KVCodec(fmt, model.dtype, cfg.head_dim)
    runner.kv.copy_(codec.decode(codec.encode(runner.kv)))  # what a load from the tier hands back
    base = runner.length
    tokens = greedy(runner, prompt, NEW_TOKENS)
    runner.length = base
    follow = exact[0] if exact is not None else tokens
    lp = torch.log_softmax(prefill(runner, prompt + follow[:-1], logits_from=len(prompt) - 1).float(), dim=-1)
    runner.length = base
    logits = prefill(runner, held_out, logits_from=0)[:-1].float()
    nll = float(-torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(held_out[1:])[:, None]).mean())
    return tokens, lp, nll


def leading(a: list[int], b: list[int]) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return n / len(a)


def run_model(name: str, count: int) -> tuple[dict[str, Result], dict[str, int], str]:
    files = resolve_model(name)
    model = LlamaModel.load(files.directory, torch.float32, "cpu")
    tok = Tokenizer(files.directory)
    log(f"{files.name}: building {count} conversations")
    convs = conversations(name, tok, model, count)
    held_out = tok.encode(multiturn.conversations(count + 1, 1, (300, 350), (1, 2))[-1][0],
                          add_special_tokens=False)[:300]
    results = {f: Result() for f in FORMATS}
    for i, (history, prompt) in enumerate(convs):
        exact_tokens, exact_lp, exact_nll = evaluate(model, "model", history, prompt, held_out, None)
        for fmt in FORMATS:
            tokens, lp, nll = (exact_tokens, exact_lp, exact_nll) if fmt == "model" else evaluate(
                model, fmt, history, prompt, held_out, (exact_tokens, exact_lp))
            r = results[fmt]
            r.agreement.append(leading(tokens, exact_tokens))
            r.kl.append(float((exact_lp.exp() * (exact_lp - lp)).sum(-1).mean()))
            r.nll.append(nll)
        log(f"{files.name}: conversation {i + 1}/{len(convs)} ({len(history)} history tokens): "
            + ", ".join(f"{f} KL {results[f].kl[-1]:.5f} agree {results[f].agreement[-1]:.0%}" for f in FORMATS))
    cfg = model.cfg
    per_token = {f: 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * KVCodec(f, torch.float32, cfg.head_dim)
                 .row_bytes for f in FORMATS}
    per_token["bfloat16"] = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    return results, per_token, files.name


def table(results: dict[str, Result], per_token: dict[str, int]) -> str:
    rows = ["| format | bytes per token | vs float32 | vs bfloat16 | greedy agreement (128 tokens) | all 128 equal "
            "| mean KL | held-out perplexity | gate |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    ref_ppl = statistics.mean(results["model"].nll)
    for fmt, r in results.items():
        kl, agree = statistics.mean(r.kl), statistics.mean(r.agreement)
        passes = kl <= KL_GATE and agree >= AGREEMENT_GATE
        rows.append(f"| {fmt if fmt != 'model' else 'model (float32)'} | {per_token[fmt]:,} | "
                    f"{per_token['model'] / per_token[fmt]:.2f}x | {per_token['bfloat16'] / per_token[fmt]:.2f}x | "
                    f"{agree:.1%} | {sum(a == 1.0 for a in r.agreement)}/{len(r.agreement)} | {kl:.5f} | "
                    f"{torch.tensor(statistics.mean(r.nll)).exp():.3f} (float32: {torch.tensor(ref_ppl).exp():.3f}) "
                    f"| {'passes' if passes else 'fails'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["default", "gemma-3-270m"])
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    sections = []
    for name in args.models:
        results, per_token, shown = run_model(name, args.conversations)
        body = table(results, per_token)
        print(f"\n{shown}\n{body}\n")
        sections.append(f"### {shown}\n\n{body}\n")
    if not args.no_doc:
        head = DOC.read_text().split("<!-- kv-quality: begin -->")[0] if DOC.exists() else ""
        tail = DOC.read_text().split("<!-- kv-quality: end -->")[1] if DOC.exists() and "<!-- kv-quality: end -->" \
            in DOC.read_text() else ""
        shown_argv = " ".join(sys.argv[1:] if argv is None else argv)
        DOC.write_text(f"{head}<!-- kv-quality: begin -->\n`python benchmarks/kv_quality.py {shown_argv}` "
                       f"(`make bench-kv-quality`) on {cpu_name()}, {time.strftime('%Y-%m-%d')}: "
                       f"{args.conversations} conversations per model, float32 models.\n\n"
                       + "\n".join(sections) + f"<!-- kv-quality: end -->{tail}")
        log(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
