"""llama.cpp for the benchmarks that hold strata against it: the build, the model files, the server command.

- `ensure_built()` runs benchmarks/llama_cpp_env.sh (llama.cpp from llama-cpp-python's sdist on PyPI, built for
  this CPU's x86 features without -march=native) unless its build is there.
- `model_files(gguf)`: the shipped Q4_1 file itself, an F32 GGUF of the same weights and a Q8_0 quantized from that
  F32 (`llama-quantize --allow-requantize`), made once under .bench/quant/.
- `server_cmd(...)`: llama-server with the model's own chat template (--jinja), every core, prompt caching per slot
  (its default).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".bench" / "llama.cpp" / "build" / "bin"
FILES = REPO / ".bench" / "quant"
ENV_SCRIPT = REPO / "benchmarks" / "llama_cpp_env.sh"


def ensure_built() -> None:
    subprocess.run(["bash", str(ENV_SCRIPT)], check=True)


def model_files(gguf: Path) -> dict[str, Path]:
    """{"F32", "Q8_0", "Q4_1"} -> GGUF file, the shipped Q4_1 file being the source of the other two."""
    FILES.mkdir(parents=True, exist_ok=True)
    f32, q8 = FILES / "f32.gguf", FILES / "q8_0.gguf"
    quantize = str(BIN / "llama-quantize")
    if not f32.exists():
        subprocess.run([quantize, "--allow-requantize", str(gguf), str(f32), "F32"], check=True, capture_output=True)
    if not q8.exists():
        subprocess.run([quantize, str(f32), str(q8), "Q8_0"], check=True, capture_output=True)
    return {"F32": f32, "Q8_0": q8, "Q4_1": gguf}


def server_cmd(model: Path, port: int, slots: int = 1, context: int = 4096) -> list[str]:
    """llama-server on a loopback port: `slots` parallel sequences sharing a context of `context` tokens each."""
    return [str(BIN / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(context * slots), "-t", str(os.cpu_count() or 1), "--jinja",
            "--no-webui"]
