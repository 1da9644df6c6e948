"""The CUDA extension (csrc/): compiled once with torch's C++ extension tooling, then loaded from a cache.

The build directory is named after a hash of the sources and of the torch/CUDA versions, so a stale
build is never loaded. A build found there is imported directly (no compiler needed: the container
image ships one built at image build time); otherwise it is compiled on first use (a few minutes,
needs nvcc). Where neither works, ``extension()`` returns None and every op runs the PyTorch reference.

Cache: ``STRATA_KERNEL_CACHE``, default ``$STRATA_HOME/kernels`` (``~/.cache/strata/kernels``).
``python -m strata.kernels.cuda_ext`` builds it ahead of time (set ``TORCH_CUDA_ARCH_LIST`` without a GPU).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "paged_attention.cu", "kv_write.cu", "kv_copy.cu", "quant_linear.cu")

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def cache_dir() -> Path:
    if "STRATA_KERNEL_CACHE" in os.environ:
        return Path(os.environ["STRATA_KERNEL_CACHE"])
    return Path(os.environ.get("STRATA_HOME", Path.home() / ".cache" / "strata")) / "kernels"


def build_name() -> str:
    h = hashlib.sha256(f"{torch.__version__} {torch.version.cuda}".encode())
    for f in sorted(CSRC.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return f"strata_kernels_{h.hexdigest()[:12]}"


def import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False) -> ModuleType:
    """Load the cached build, compiling it first if there is none (raises if that fails)."""
    from torch.utils.cpp_extension import load

    name = build_name()
    directory = cache_dir() / name
    built = directory / f"{name}.so"
    if built.exists():
        log.info("CUDA kernels: loading %s", built)
        return import_file(built, name)
    directory.mkdir(parents=True, exist_ok=True)
    log.info("CUDA kernels: compiling %s into %s (first use; takes a few minutes)", name, directory)
    t0 = time.monotonic()
    module = load(name=name, sources=[str(CSRC / s) for s in SOURCES], build_directory=str(directory),
                  extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"], verbose=verbose)
    log.info("CUDA kernels: compiled in %.0f s", time.monotonic() - t0)
    return module


def extension() -> ModuleType | None:
    """The compiled kernels, or None where there is no GPU or they cannot be built (logged once)."""
    if "ext" not in _loaded:
        with _lock:  # the loader thread and the engine thread may both ask first
            if "ext" not in _loaded:
                _loaded["ext"] = _try_build()
    return _loaded["ext"]


def _try_build() -> ModuleType | None:
    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    try:
        return build()
    except Exception as e:  # no nvcc, no ninja, a compile error: stay correct on the reference path
        log.warning("CUDA kernels unavailable, the PyTorch reference runs on the GPU instead: %s", e)
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(verbose=True)
