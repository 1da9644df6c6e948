"""KV blocks a skipping request holds in the engine's device pool, against the full model.

Run: `python benchmarks/skip_kv.py [--tokens 2048]` (needs the AdaSkip profile: `strata calibrate`).
One request at a time through LLMEngine (sessions off), greedy, 3 new tokens; the peak of the pool's
used blocks (a block: one layer's K/V of 16 tokens) is what the request held. Counts, not timings,
so the result does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import importlib
import pydoc

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.request import Request, SkipRequest
from strata.engine.sampling_params import SamplingParams

CONFIGS: list[tuple[str, SkipRequest | None]] = [
    ("full model", None),
    ("adaskip 8 e2e", SkipRequest(8, "e2e")),
    ("adaskip 16 e2e", SkipRequest(16, "e2e")),
    ("adaskip 16 decode", SkipRequest(16, "decode")),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens")
    args = ap.parse_args(argv)
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.5, session_cache=False))
    text = pydoc.render_doc(importlib.import_module("argparse"), renderer=pydoc.plaintext)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)[: args.tokens]
    print(f"| request ({len(ids)}-token prompt) | peak blocks | MiB | of the full model |")
    print("|---|---:|---:|---:|")
    full = 0
    for name, skip in CONFIGS:
        engine.add_request(Request(name, ids, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                                   skip=skip))
        peak = 0
        while engine.has_work():
            engine.step()
            peak = max(peak, engine.pool.num_used)
        full = full or peak
        print(f"| {name} | {peak} | {peak * engine.pool.block_bytes / 2**20:.1f} | {peak / full:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
