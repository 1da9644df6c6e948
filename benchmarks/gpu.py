"""GPU benchmark: the kernels and tier transfers against what the device can do, on one GPU in one run.

1. Device memory: the measured copy bandwidth of a large tensor copy (bytes read + written / time) vs
   paged decode attention's effective bandwidth (bytes of K/V read / time), Llama-3-8B layer shape
   (32 query heads, 8 KV heads, head_dim 128, bf16, blocks of 16 shuffled in the pool), contexts
   4k..32k tokens, batch 1..16. Goal: >= 60% of the copy bandwidth for long contexts (>= 16k).
2. Host to device: the measured pinned host-to-device copy rate vs the KV load rate through the tier
   loader (KVStore.start_load + wait_layer for every layer, DRAM tier in pinned memory, the block-copy
   kernel on the load stream), 8k tokens of the same model shape (32 layers, 1 GiB). Goal: >= 70%.
   The SSD tier's load rate is printed too (chunk files just written: mostly the page cache).
3. Multi-turn TTFT with and without sessions: benchmarks/multiturn.py --quick (sessions off vs the
   scheduler-aware tiers) with every server on this GPU (STRATA_DEVICE=cuda).

Prints the tables and ratios and writes docs/gpu-benchmarks.md. Exits with a message where there is no GPU.

    python benchmarks/gpu.py                  # everything (a few minutes)
    python benchmarks/gpu.py --no-multiturn   # kernels and transfers only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from strata.kernels import cuda_ext, ops, paged_attention
from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVStore

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "gpu-benchmarks.md"
HEADS, KV_HEADS, DIM, LAYERS, BLOCK = 32, 8, 128, 32, 16  # Llama-3-8B
DTYPE = torch.bfloat16
DECODE_GOAL, LOAD_GOAL, LONG_CONTEXT = 0.60, 0.70, 16384


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class L2Flush:
    """Writing a buffer larger than the L2 cache between timed calls, so every call reads device memory."""

    def __init__(self) -> None:
        size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
        self.buf = torch.empty(max(4 * size, 256 << 20), dtype=torch.uint8, device="cuda")

    def __call__(self) -> None:
        self.buf.zero_()


def cuda_seconds(fn: Callable[[], object], flush: L2Flush, iters: int = 20, warmup: int = 3) -> float:
    """Median device time of one call, cold L2."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(flush: L2Flush) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_seconds(lambda: dst.copy_(src), flush, iters=10)
    return 2 * src.numel() / t  # read + written


def decode_case(batch: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    blocks_per_seq = context // BLOCK
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).cuda()
    lens = torch.full((batch,), context, dtype=torch.long, device="cuda")
    q = torch.randn(batch, HEADS, DIM, dtype=DTYPE, device="cuda")
    return q, k_cache, v_cache, tables, lens


def measure_decode(flush: L2Flush, batch: int, context: int, gen: torch.Generator) -> dict[str, float]:
    q, k, v, tables, lens = decode_case(batch, context, gen)
    kv_bytes = 2 * k.numel() * k.element_size()
    t = cuda_seconds(lambda: ops.paged_decode_attention(q, k, v, tables, lens, DIM**-0.5), flush)
    row = {"context": context, "batch": batch, "kv_mib": kv_bytes / 2**20, "us": t * 1e6, "gbs": kv_bytes / t / 1e9}
    if batch == 1:  # the PyTorch reference, for scale
        ref = cuda_seconds(lambda: paged_attention.paged_decode_attention(q, k, v, tables, lens, DIM**-0.5), flush,
                           iters=5)
        row["ref_us"] = ref * 1e6
    return row


def bench_decode(flush: L2Flush, contexts: list[int], batches: list[int]) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for context in contexts:
        for batch in batches:
            rows.append(measure_decode(flush, batch, context, gen))
            torch.cuda.empty_cache()
            log(f"decode context {context} batch {batch}: {rows[-1]['us']:.0f} us, {rows[-1]['gbs']:.0f} GB/s")
    return rows


def h2d_rate(flush: L2Flush) -> float:
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    t = cuda_seconds(lambda: dev.copy_(host, non_blocking=True), flush, iters=10)
    return host.numel() / t


def tier_load_rates(tokens: int, ssd_dir: Path) -> dict[str, float]:
    """Fill a session through the save path, then time loads into fresh device blocks: DRAM, then SSD."""
    pool = BlockPool(LAYERS, KV_HEADS, DIM, BLOCK, LAYERS * (2 * tokens // BLOCK + 8), DTYPE, device="cuda")
    pool.kv.normal_()
    token_bytes = LAYERS * 2 * KV_HEADS * DIM * pool.kv.element_size()
    budget = 2 * tokens * token_bytes
    ids = list(range(tokens + 1))
    src = BlockTable.allocate(pool, tokens)
    store = KVStore(pool, model_fingerprint="bench", dram_bytes=budget, ssd_dir=ssd_dir, ssd_bytes=4 * budget)
    store.save("s", ids, src, 0, tokens)
    store.finish("s", ids)
    store.flush()

    def timed_load(s: KVStore) -> float:
        dst = BlockTable.allocate(pool, tokens)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        handle = s.start_load("s", ids, tokens, dst)
        for layer in range(LAYERS):
            s.wait_layer(handle, layer, timeout=120)
        torch.cuda.synchronize()  # the runner's stream waited on the last layer's event
        elapsed = time.perf_counter() - t0
        want, got = pool.read(src.slots(BLOCK, 0, tokens)), pool.read(dst.slots(BLOCK, 0, tokens))
        assert torch.equal(got, want), "loaded KV differs from what was saved"
        dst.release(pool)
        return tokens * token_bytes / elapsed

    assert store.lookup("s", ids) == (tokens, "dram")
    timed_load(store)  # warm-up: first use of the stream, the kernel, the pinned buffers
    dram = statistics.median(timed_load(store) for _ in range(5))
    store.close()  # writes every chunk to the SSD tier
    restarted = KVStore(pool, model_fingerprint="bench", dram_bytes=budget, ssd_dir=ssd_dir, ssd_bytes=4 * budget)
    assert restarted.lookup("s", ids) == (tokens, "ssd")
    ssd = timed_load(restarted)
    restarted.close()
    return {"dram": dram, "ssd": ssd, "bytes": tokens * token_bytes}


def run_multiturn() -> tuple[str, int]:
    """benchmarks/multiturn.py as its CLI, every server on the GPU; its stdout (tables and goals)."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "multiturn.py"), "--quick", "--modes", "off", "scheduler",
           "--no-doc"]
    env = {**os.environ, "STRATA_DEVICE": "cuda"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        return f"multiturn.py exited with {run.returncode}:\n\n```\n{run.stderr[-3000:]}\n```", run.returncode
    return run.stdout.strip(), 0


def fmt_decode(rows: list[dict[str, float]], copy_bw: float) -> str:
    out = ["| context | batch | KV read (MiB) | time (us) | GB/s | of copy bandwidth | reference (us) |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = f"{r['ref_us']:.0f}" if "ref_us" in r else ""
        out.append(f"| {r['context']} | {r['batch']} | {r['kv_mib']:.0f} | {r['us']:.0f} | {r['gbs']:.0f} | "
                   f"{r['gbs'] * 1e9 / copy_bw:.0%} | {ref} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--load-tokens", type=int, default=8192)
    ap.add_argument("--no-multiturn", action="store_true", help="skip the multi-turn TTFT run")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/gpu-benchmarks.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs an NVIDIA GPU and a CUDA build of torch; none is available here.")
        return 2
    if cuda_ext.extension() is None:
        print("benchmarks/gpu.py: the CUDA kernels did not build or load (see the warning above).")
        return 2
    name = torch.cuda.get_device_name()
    log(f"device: {name}")
    flush = L2Flush()
    copy_bw = copy_bandwidth(flush)
    log(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    decode = bench_decode(flush, args.contexts, args.batches)
    h2d = h2d_rate(flush)
    log(f"pinned host-to-device: {h2d / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory(prefix="strata-gpu-bench-") as tmp:
        loads = tier_load_rates(args.load_tokens, Path(tmp))
    log(f"tier loads: DRAM {loads['dram'] / 1e9:.1f} GB/s, SSD {loads['ssd'] / 1e9:.1f} GB/s")

    long_rows = [r for r in decode if r["context"] >= LONG_CONTEXT]
    decode_ratio = min(r["gbs"] * 1e9 / copy_bw for r in long_rows) if long_rows else float("nan")
    load_ratio = loads["dram"] / h2d
    goals = [
        (decode_ratio >= DECODE_GOAL, f"paged decode attention, contexts >= {LONG_CONTEXT}: at least "
         f"{decode_ratio:.0%} of the device copy bandwidth (goal {DECODE_GOAL:.0%})"),
        (load_ratio >= LOAD_GOAL, f"KV loads from the DRAM tier: {load_ratio:.0%} of the pinned host-to-device "
         f"rate (goal {LOAD_GOAL:.0%})"),
    ]
    transfers = "\n".join([
        "| transfer | GB/s | of pinned host-to-device |", "|---|---:|---:|",
        f"| pinned host-to-device copy (1 GiB) | {h2d / 1e9:.1f} | 100% |",
        f"| KV load, DRAM tier ({loads['bytes'] / 2**30:.2f} GiB, {LAYERS} layers) | {loads['dram'] / 1e9:.1f} | "
        f"{load_ratio:.0%} |",
        f"| KV load, SSD tier (page cache warm) | {loads['ssd'] / 1e9:.1f} | {loads['ssd'] / h2d:.0%} |"])
    body = (f"## Device memory\n\nDevice copy bandwidth (1 GiB copy, read + written): **{copy_bw / 1e9:.0f} GB/s**.\n\n"
            f"Paged decode attention, {HEADS} query / {KV_HEADS} KV heads, head_dim {DIM}, bf16, blocks of {BLOCK}:"
            f"\n\n{fmt_decode(decode, copy_bw)}\n\n## Host to device\n\n{transfers}\n")
    print(body)
    for ok, text in goals:
        print(f"[{'met' if ok else 'MISSED'}] {text}")

    multiturn = ""
    if not args.no_multiturn:
        log("multi-turn benchmark (sessions off vs on), servers on this GPU ...")
        out, rc = run_multiturn()
        print(out)
        multiturn = f"\n## Multi-turn TTFT, sessions off vs on (benchmarks/multiturn.py --quick)\n\n{out}\n"

    if not args.no_doc:
        shown = " ".join(["python benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)])
        DOC.write_text(
            "# GPU benchmarks\n\nGenerated by `benchmarks/gpu.py`; see its docstring for what is measured.\n\n"
            f"- command: `{shown}`\n- date: {datetime.date.today().isoformat()}, {name}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), Python {platform.python_version()}\n\n## Goals\n\n"
            + "\n".join(f"- **{'met' if ok else 'missed'}**: {text}" for ok, text in goals)
            + "\n\n" + body + multiturn)
        log(f"wrote {DOC.relative_to(REPO)}")
    return 0 if all(ok for ok, _ in goals) else 1


if __name__ == "__main__":
    raise SystemExit(main())
