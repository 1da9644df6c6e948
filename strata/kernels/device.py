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
