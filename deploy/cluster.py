"""Scale-out on one machine: N strata servers on loopback behind nginx hashing X-Session-ID consistently,
with the same router config as Kubernetes (deploy/nginx/router.conf.template).

    make cluster                                   # 3 servers, router on 127.0.0.1:8000
    python deploy/cluster.py --instances 4 --port 9000 -- --kv-cache-gb 0.5

Each server has its own SSD tier directory under --workdir (as each pod has its PVC). The tests drive the
same class: add a server, kill one, restart it.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router_config import local  # noqa: E402  (deploy/ is not a package)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answered_by(upstream_header: str) -> str:
    """The server that answered, from X-Strata-Upstream: nginx lists the servers tried, ", " between retries
    on one ring and " : " before the spill ring's."""
    return re.split(r", | : ", upstream_header)[-1]


def nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("nginx is not installed: run `make services` (Debian's nginx package)")


class RedisServer:
    """Debian's redis-server on a loopback port, nothing persisted (the shared KV tier of the tests and of
    `make cluster REMOTE=1`), set up as in production: TLS only (a CA and a server certificate made here
    with openssl), a password, and a signing key for the chunks; ``strata_args()`` hands them to strata
    through files, never through argv."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.url = f"rediss://127.0.0.1:{self.port}/0"
        self.password = secrets.token_urlsafe(24)
        self.ca_file = directory / "ca.crt"
        self.password_file = _secret_file(directory / "redis-password", self.password)
        self.signing_key_file = _secret_file(directory / "signing-key", secrets.token_urlsafe(48))
        _make_certificates(directory)
        conf = _secret_file(directory / "redis.conf", "\n".join([
            "port 0", f"tls-port {self.port}", "bind 127.0.0.1", 'save ""', "appendonly no",
            f"dir {directory}", f"tls-cert-file {directory / 'server.crt'}", f"tls-key-file {directory / 'server.key'}",
            f"tls-ca-cert-file {self.ca_file}", "tls-auth-clients no", f"requirepass {self.password}", ""]))
        self.proc = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", str(conf)],
                                     stdout=open(directory / "redis.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise TimeoutError(f"redis-server did not start: {(directory / 'redis.log').read_text()[-1000:]}")

    def strata_args(self) -> list[str]:
        return ["--remote-kv", self.url, "--remote-kv-ca-file", str(self.ca_file),
                "--remote-kv-password-file", str(self.password_file),
                "--remote-kv-signing-key-file", str(self.signing_key_file)]

    def client(self) -> Any:  # a redis.Redis (imported here: the cluster script itself needs no redis package)
        import redis

        return redis.Redis.from_url(self.url, password=self.password, ssl_ca_certs=str(self.ca_file))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _secret_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _make_certificates(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=strata test CA",
            "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.crt")


@dataclass
class Instance:
    name: str
    port: int
    directory: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    workdir: Path
    strata_args: list[str] = field(default_factory=list)
    router_port: int = 0
    upstream_header: bool = False  # X-Strata-Upstream in the router's answers (tests, debugging)
    instances: list[Instance] = field(default_factory=list)
    _nginx: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.router_port = self.router_port or free_port()
        (self.workdir / "nginx").mkdir(exist_ok=True)

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def add(self, count: int = 1, wait: bool = True) -> list[Instance]:
        """Start `count` more servers; the router's ring takes them in (nginx reloads its config)."""
        new = []
        for _ in range(count):
            i = len(self.instances)
            inst = Instance(f"strata-{i}", free_port(), self.workdir / f"strata-{i}")
            self.instances.append(inst)
            self.start(inst)
            new.append(inst)
        if wait:
            for inst in new:
                self.wait_ready(inst)
        self._write_router()
        return new

    def start(self, inst: Instance) -> None:
        inst.directory.mkdir(parents=True, exist_ok=True)
        log = open(inst.directory / "server.log", "ab")  # noqa: SIM115 (the process owns it)
        inst.proc = subprocess.Popen(
            [sys.executable, "-m", "strata", "serve", "--port", str(inst.port), "--log-level", "warning",
             "--ssd-dir", str(inst.directory / "ssd"), *self.strata_args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ})

    def wait_ready(self, inst: Instance, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert inst.proc is not None
            if inst.proc.poll() is not None:
                raise RuntimeError(f"{inst.name} exited: {(inst.directory / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(inst.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{inst.name} did not become healthy")

    def kill(self, inst: Instance) -> None:
        """kill -9: no shutdown, no flush (what a crashed node does)."""
        assert inst.proc is not None
        inst.proc.send_signal(signal.SIGKILL)
        inst.proc.wait()

    def restart(self, inst: Instance) -> None:
        """The same server again: its port (its place on the ring) and its SSD tier directory."""
        self.start(inst)
        self.wait_ready(inst)

    def _write_router(self) -> None:
        runtime = self.workdir / "nginx"
        conf = runtime / "nginx.conf"
        conf.write_text(local([i.port for i in self.instances], self.router_port, runtime, self.upstream_header))
        if self._nginx is None:
            stderr = open(runtime / "stderr.log", "ab")  # noqa: SIM115 (the process owns it)
            self._nginx = subprocess.Popen([nginx_binary(), "-c", str(conf), "-e", str(runtime / "error.log"),
                                            "-g", "daemon off;"], stderr=stderr)
            self._wait_router()
        else:
            subprocess.run([nginx_binary(), "-c", str(conf), "-e", str(runtime / "error.log"), "-s", "reload"],
                           check=True)
            time.sleep(1.0)  # the old workers finish; the new ones take the new ring

    def _wait_router(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(self.router_url + "/health", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        runtime = self.workdir / "nginx"
        raise TimeoutError(f"nginx did not start: {(runtime / 'stderr.log').read_text()[-1000:]}")

    def stop(self) -> None:
        if self._nginx is not None:
            self._nginx.terminate()
            self._nginx.wait(10)
            self._nginx = None
        for inst in self.instances:
            if inst.proc is not None and inst.proc.poll() is None:
                inst.proc.terminate()
        for inst in self.instances:
            if inst.proc is not None:
                try:
                    inst.proc.wait(40)
                except subprocess.TimeoutExpired:
                    inst.proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--port", type=int, default=8000, help="the router's port")
    ap.add_argument("--workdir", type=Path, default=Path(".cluster"))
    ap.add_argument("--upstream-header", action="store_true",
                    help="the router answers with X-Strata-Upstream (the servers tried)")
    ap.add_argument("--shared-tier", action="store_true",
                    help="a local redis-server (TLS, password, signed chunks) as every server's --remote-kv")
    ap.add_argument("strata_args", nargs=argparse.REMAINDER, help="after --: flags for every strata server")
    args = ap.parse_args()
    extra = args.strata_args[1:] if args.strata_args[:1] == ["--"] else args.strata_args
    store = RedisServer(args.workdir.resolve() / "redis") if args.shared_tier else None
    cluster = Cluster(args.workdir.resolve(), extra + (store.strata_args() if store else []), args.port,
                      args.upstream_header)
    try:
        print(f"starting {args.instances} strata servers ...", flush=True)
        cluster.add(args.instances)
        for inst in cluster.instances:
            print(f"  {inst.name}: {inst.url} (SSD tier {inst.directory / 'ssd'})", flush=True)
        print(f"router (nginx, X-Session-ID affinity): {cluster.router_url}/v1  -- Ctrl-C stops", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        if store is not None:
            store.stop()


if __name__ == "__main__":
    main()
