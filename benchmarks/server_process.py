"""`strata serve` as a subprocess on a loopback port, for the benchmarks that drive the real server."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m strata serve` on a loopback port; stopped with SIGTERM."""

    def __init__(self, flags: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "strata", "serve", "--port", str(self.port), "--log-level", "warning", *flags]
        out = open(log, "wb") if log else None  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out,
                                     stderr=subprocess.STDOUT if out else None)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {shlex.join(cmd)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not become healthy in 300 s")

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape_metrics(url: str) -> dict[str, float]:
    """A server's Prometheus samples as {'name{labels}': value} (histogram buckets dropped)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or "_bucket{" in line or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out
