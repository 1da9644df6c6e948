"""What this machine can do at most, and how much of a decode step is host time rather than kernels.

- GEMM rate: float32 matrix products at prefill shapes (512 rows against each of the default model's four
  weight shapes, oneDNN with the weight prepacked, as the servers run them), GFLOP/s.
- Memory bandwidth: reading 1 GiB (a sum), GB/s, the ceiling of a decode step that streams every weight once;
  and a copy of 1 GiB (read + write bytes).
- Host time per decode step (strata, in process): the engine's step at 1 and 16 running sequences, split into
  time inside compiled kernels (the CPU extension's functions and every linear layer, each call timed) and
  everything else (Python, batch metadata, scheduling, sampling, detokenization).

    python benchmarks/machine_limits.py     # prints all three (benchmarks/serving.py calls the functions)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # q/k/v, o, gate/up, down of the default model


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    """A limit is what the machine can do: its fastest repeat (a neighbour on shared cores only slows some)."""
    return min(_times(fn, repeats))


def gemm_rate(rows: int = 512, repeats: int = 10) -> float:
    """GFLOP/s of float32 oneDNN matmuls at prefill shapes (prepacked weights)."""
    gen = torch.Generator().manual_seed(0)
    packed = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, generator=gen), 16) for n, k in SHAPES]
    xs = {k: torch.randn(rows, k, generator=gen) for _, k in SHAPES}

    def run() -> None:
        for w, (_, k) in zip(packed, SHAPES, strict=True):
            torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")

    flops = 2 * rows * sum(n * k for n, k in SHAPES)
    return flops / _best_time(run, repeats) / 1e9


def memory_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """GB/s of a large copy, bytes read plus bytes written."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), repeats) / 1e9


def read_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """GB/s of reading a large tensor (a sum): what a decode step streaming its weights can reach at most."""
    src = torch.ones(int(gib * 2**30) // 4)
    return src.numel() * 4 / _best_time(lambda: src.sum(), repeats) / 1e9


@dataclass
class StepTime:
    batch: int
    step_ms: float
    kernel_ms: float

    @property
    def host_ms(self) -> float:
        return self.step_ms - self.kernel_ms


class _KernelClock:
    """Wraps the CPU extension's functions and the prepacked float matmul so that each call is timed."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def host_time(quantization: str, batches: tuple[int, ...] = (1, 16), steps: int = 40) -> list[StepTime]:
    """Per decode step at each batch size: wall time and the part inside compiled kernels (medians)."""
    from strata.engine.config import EngineConfig
    from strata.engine.llm_engine import LLMEngine
    from strata.engine.request import Request
    from strata.engine.sampling_params import SamplingParams
    from strata.kernels import cpu_ext, linear

    engine = LLMEngine(EngineConfig(quantization=quantization, session_cache=False, kv_cache_gb=0.25))
    clock = _KernelClock()
    ext = cpu_ext.extension()
    originals = {}
    if ext is not None:
        for name in ("paged_attention", "rms_norm", "add_rms_norm", "silu_mul", "rotary_store_kv"):
            originals[name] = getattr(ext, name)
            setattr(ext, name, clock.wrap(originals[name]))
    linear_call = linear.Linear.__call__  # every linear layer, float or quantized (a microsecond of Python in it)
    linear.Linear.__call__ = clock.wrap(linear_call)
    try:
        out = []
        for b in batches:
            for i in range(b):
                engine.add_request(Request(f"host-{b}-{i}", list(range(100, 228)),
                                           SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)))
            for _ in range(4):  # the prompts' prefill, then decode steps only
                engine.step()
            walls, kernels = [], []
            while engine.has_work():
                clock.seconds = 0.0
                t0 = time.perf_counter()
                engine.step()
                walls.append(time.perf_counter() - t0)
                kernels.append(clock.seconds)
            out.append(StepTime(b, statistics.median(walls) * 1e3, statistics.median(kernels) * 1e3))
        return out
    finally:
        linear.Linear.__call__ = linear_call
        for name, fn in originals.items():
            setattr(ext, name, fn)
        engine.close()


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    print(f"GEMM rate (float32, oneDNN, 512 rows): {gemm_rate():.0f} GFLOP/s")
    print(f"memory bandwidth: {read_bandwidth():.1f} GB/s reading, {memory_bandwidth():.1f} GB/s copying (1 GiB)")
    for q in ("none", "int4"):
        for s in host_time(q):
            print(f"{q} batch {s.batch}: step {s.step_ms:.2f} ms, kernels {s.kernel_ms:.2f} ms, "
                  f"host {s.host_ms:.2f} ms")
