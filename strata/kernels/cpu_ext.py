"""The CPU kernels (csrc_cpu/): compiled on first use with torch's C++ extension tooling, then loaded from a cache.

A plain Python module (``extension()``): decode attention, the block-quantized linear layers and the fused
element-wise steps of a decoder layer.

They are built for the CPU they run on (``-march=native``), so the build's name hashes the sources, the
torch version and the CPU's model and flags: a cache shared by different machines never loads a build
made for another. Where no compiler is found or the build fails, ``extension()`` is None (logged
once) and every op runs the PyTorch reference. ``python -m strata.kernels.cpu_ext`` builds it ahead of time.

Cache: ``STRATA_KERNEL_CACHE``, default ``$STRATA_HOME/kernels`` (``~/.cache/strata/kernels``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from strata.kernels.cuda_ext import cache_dir, import_file

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc_cpu"
SOURCES = ("bindings.cpp", "paged_attention.cpp", "linear.cpp", "fused_ops.cpp")
# Built for this CPU; fast math for vectorized exp and reductions, but inf and NaN keep their meaning.
CFLAGS = ["-O3", "-march=native", "-std=c++20", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
DISABLE_ENV = "STRATA_CPU_KERNELS"  # "0": run the PyTorch reference on CPU

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def build_name() -> str:
    h = hashlib.sha256(f"{torch.__version__} {platform.machine()} {CFLAGS}\n{_cpu_signature()}".encode())
    for name in SOURCES:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    return f"strata_cpu_kernels_{h.hexdigest()[:12]}"


def build(verbose: bool = False) -> ModuleType:
    """Load the cached build, compiling it first if there is none (raises if that fails)."""
    from torch.utils.cpp_extension import load

    name = build_name()
    directory = cache_dir() / name
    built = directory / f"{name}.so"
    if built.exists():
        return import_file(built, name)
    directory.mkdir(parents=True, exist_ok=True)
    log.info("CPU kernels: compiling %s into %s (first use; takes about a minute)", name, directory)
    t0 = time.monotonic()
    module = load(name=name, sources=[str(CSRC / s) for s in SOURCES], build_directory=str(directory),
                  extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=verbose)
    log.info("CPU kernels: compiled in %.0f s", time.monotonic() - t0)
    return module


def extension() -> ModuleType | None:
    """The compiled CPU kernels (building or loading them on the first call), or None: the reference runs."""
    if (ext := _loaded.get("ext", False)) is not False:  # the hot path: called for every op
        return ext
    if "ext" not in _loaded:
        with _lock:  # the loader thread and the engine thread may both ask first
            if "ext" not in _loaded:
                _loaded["ext"] = _try_build()
    return _loaded["ext"]


def loaded() -> bool:
    return extension() is not None


def _try_build() -> ModuleType | None:
    if os.environ.get(DISABLE_ENV) == "0":
        log.info("CPU kernels off (%s=0): the PyTorch reference runs", DISABLE_ENV)
        return None
    try:
        return build()
    except Exception as e:  # no compiler, no ninja, a compile error: stay correct on the reference path
        log.warning("CPU kernels unavailable, the PyTorch reference runs instead: %s", e)
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(verbose=True)
