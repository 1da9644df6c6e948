"""Where the model and the KV block pool live: "cpu", "cuda" or "cuda:N".

`strata serve --device` chooses it; its default, and the default of every other entry point (the
benchmarks, the tests, the container), is the environment variable ``STRATA_DEVICE`` ("cpu" unless set).
"""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    return resolve_device(os.environ.get("STRATA_DEVICE", "cpu"))


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} asked for, but no CUDA GPU is visible (is torch a CUDA build?)")
        if device.index is None:  # an explicit index, so tensors' devices compare equal
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cpu_flags() -> set[str]:
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {flag for line in info.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def fast_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype `--dtype auto` picks on `device`, and why: bfloat16 where the hardware computes it natively
    (GPUs that support it; CPUs with AVX-512 BF16 or AMX), else float16 on older GPUs and float32 on CPUs."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "a GPU with bfloat16"
        return torch.float16, "a GPU without bfloat16"
    flags = _cpu_flags() & {"avx512_bf16", "amx_bf16"}
    if flags:
        return torch.bfloat16, f"a CPU with {' and '.join(sorted(flags))}"
    return torch.float32, "a CPU without AVX-512 BF16 or AMX"
