"""Offline AdaSkip calibration: IO similarity of every sublayer over long prompts, no skipping.

Statistics are per-token means over a request (less dominated by attention-sink tokens than
ratios of whole-request norms), then plain means over requests. Each prompt is prefilled in
chunks (`chunk` tokens, attending to the whole history), which gives the same statistics as
one pass and bounds memory.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from strata.engine.models.llama import LlamaModel
from strata.engine.skip import corpus as docs_corpus
from strata.engine.skip.profile import SkipProfile, profile_path
from strata.engine.skip.sequence_runner import SequenceRunner
from strata.engine.tokenizer import Tokenizer
from strata.engine.weights.model_files import resolve_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATS = ("sim_attn", "scale_attn", "sim_ffn", "scale_ffn")


def collect_statistics(model: LlamaModel, texts: Sequence[list[int]], chunk: int = 1024,
                       progress: bool = True) -> dict[str, list[float]]:
    """Per-layer means of the four IO statistics (per-token mean per request, mean over requests)."""
    layers = model.cfg.num_hidden_layers
    totals = {k: torch.zeros(layers, dtype=torch.float64) for k in STATS}
    runner = SequenceRunner(model, max(len(t) for t in texts))
    bar = tqdm(total=sum(len(t) for t in texts), unit="tok", desc="calibrating", disable=not progress)
    for ids in texts:
        runner.reset()
        sums = {k: torch.zeros(layers, dtype=torch.float64) for k in STATS}
        for start in range(0, len(ids), chunk):
            _, stats = runner.prefill(ids[start : start + chunk], measure=True)
            for layer, st in enumerate(stats):
                for k in STATS:
                    sums[k][layer] += getattr(st, k).double().sum()
            bar.update(len(ids[start : start + chunk]))
        for k in STATS:
            totals[k] += sums[k] / len(ids)
    bar.close()
    return {k: (v / len(texts)).tolist() for k, v in totals.items()}


def run_calibration(model: str = "default", corpus: str | None = None, requests: int = 20,
                    min_tokens: int = 4000, dtype: str = "float32", chunk: int = 1024,
                    progress: bool = True) -> Path:
    """Calibrate `model` (as `--model` resolves it) and write its profile next to its directory."""
    files = resolve_model(model)
    tok = Tokenizer(files.directory)
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    if corpus is None:
        texts = docs_corpus.python_docs_texts("calibration", encode, requests, min_tokens)
        description = docs_corpus.describe("calibration")
    else:
        texts = docs_corpus.file_texts(Path(corpus), encode, requests, min_tokens)
        description = f"text file {Path(corpus).name}"
    net = LlamaModel.load(files.directory, DTYPES[dtype])
    stats = collect_statistics(net, texts, chunk=chunk, progress=progress)
    profile = SkipProfile(
        model_name=files.name, fingerprint=files.fingerprint, num_layers=net.cfg.num_hidden_layers,
        sim_attn=stats["sim_attn"], sim_ffn=stats["sim_ffn"], scale_attn=stats["scale_attn"],
        scale_ffn=stats["scale_ffn"], corpus=description, requests=len(texts),
        tokens_per_request=[len(t) for t in texts],
    )
    out = profile_path(files.directory)
    profile.save(out)
    log.info("AdaSkip profile written to %s", out)
    return out


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="`default`, a .gguf file or a HF directory")
    parser.add_argument("--corpus", metavar="FILE", default=None,
                        help="UTF-8 text to calibrate on (default: Python's module docs)")
    parser.add_argument("--requests", type=int, default=20, help="number of calibration prompts")
    parser.add_argument("--min-tokens", type=int, default=4000, help="tokens per prompt")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk (memory bound)")


def calibrate_from_args(args: argparse.Namespace) -> Path:
    path = run_calibration(args.model, args.corpus, args.requests, args.min_tokens, args.dtype, args.chunk)
    print(f"AdaSkip profile: {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata calibrate", description=__doc__.splitlines()[0])
    add_calibrate_arguments(parser)
    calibrate_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
