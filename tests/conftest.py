"""Shared fixtures: the default model, a transformers oracle, and real servers in subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from strata.engine.weights.model_files import ModelFiles, resolve_model
from strata.storage.kv_codec import DEFAULT_FORMAT, KVCodec

# Bytes of one SmolLM2 token's KV (30 layers, K and V, 3 KV heads of 64) at float32 (the device pool, and the
# tiers with --kv-tier-dtype model), and in the tiers at the default tier format: what tests size pools and
# tier budgets by.
POOL_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
TIER_BYTES_PER_TOKEN = 30 * 2 * 3 * KVCodec(DEFAULT_FORMAT, torch.float32, 64).row_bytes

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def model_files() -> ModelFiles:
    return resolve_model("default")


@pytest.fixture(scope="session")
def hf_model(model_files: ModelFiles):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_files.directory), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def model(model_files: ModelFiles):
    """strata's own Llama on the default model's weights, float32 (driven directly, without an engine)."""
    from strata.engine.models.llama import LlamaModel

    return LlamaModel.load(model_files.directory, torch.float32)


@pytest.fixture(scope="session")
def tokenizer(model_files: ModelFiles):
    from strata.engine.tokenizer import Tokenizer

    return Tokenizer(model_files.directory)


@pytest.fixture(scope="session")
def engine():
    from strata.engine.config import EngineConfig
    from strata.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.25))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`strata serve` as a subprocess on a free loopback port (float32 unless `args` say otherwise: outputs are
    compared with in-process float32 engines and with transformers)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        if "--dtype" not in args:
            args = ("--dtype", "float32", *args)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strata", "serve", "--port", str(self.port), "--log-level", "warning", *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("server did not become healthy")

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path and self.log_path.exists() else ""

    def metric(self, name: str, **labels: str) -> float:
        """The first sample of `name` (with these labels, if given)."""
        text = httpx.get(self.base_url + "/metrics", timeout=5).text
        want = [f'{k}="{v}"' for k, v in labels.items()]
        for line in text.splitlines():
            if (line.startswith(name + " ") or line.startswith(name + "{")) and all(w in line for w in want):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, model_files: ModelFiles) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess("--kv-cache-gb", "0.5", log=log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", _strict_response_validation=True,
                  max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.models.list().data[0].id


@contextmanager
def started(procs: dict[str, ServerProcess]) -> Iterator[dict[str, ServerProcess]]:
    """Wait until every server is ready; stop them all on the way out, ready or not."""
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()
