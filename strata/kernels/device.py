"""Where the model and the KV block pool live: ``STRATA_DEVICE`` ("cpu" unless set; "cuda" or "cuda:N" on a GPU).

An environment variable rather than a flag so that every entry point (the server, the benchmarks, the tests,
the container) picks the same device without each of them passing it through.
"""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    device = torch.device(os.environ.get("STRATA_DEVICE", "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"STRATA_DEVICE={device} but no CUDA GPU is visible (is torch a CUDA build?)")
        if device.index is None:  # an explicit index, so tensors' devices compare equal
            device = torch.device("cuda", torch.cuda.current_device())
    return device
