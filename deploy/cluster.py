"""Scale-out on one machine: N strata servers on loopback behind the router (HAProxy: bounded-load consistent
hashing of each request's route key), with the same router config as Kubernetes
(deploy/haproxy/router.cfg.template).

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


def haproxy_binary() -> str:
    for candidate in (shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("haproxy is not installed: run `make services` (Debian's haproxy package)")


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

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        """One unlabelled value of the server's /metrics."""
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@dataclass
class Cluster:
    workdir: Path
    strata_args: list[str] = field(default_factory=list)
    router_port: int = 0
    upstream_header: bool = False  # X-Strata-Upstream in the router's answers (tests, debugging)
    balance: str = "bounded"  # router_config.BALANCE: bounded, consistent, roundrobin
    instances: list[Instance] = field(default_factory=list)
    _router: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.router_port = self.router_port or free_port()
        (self.workdir / "router").mkdir(exist_ok=True)

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def add(self, count: int = 1, wait: bool = True) -> list[Instance]:
        """Start `count` more servers; the router's ring takes them in (HAProxy reloads its config)."""
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

    def wait_uploaded(self, timeout: float = 15.0) -> None:
        """Until every live server's saves and uploads to the shared tier are done."""
        deadline = time.monotonic() + timeout
        for inst in self.instances:
            if inst.proc is None or inst.proc.poll() is not None:
                continue
            while any(inst.metric(f"strata_kv_{q}") for q in ("save_queue_bytes", "ssd_io_queue",
                                                              "remote_upload_queue")):
                if time.monotonic() > deadline:
                    raise TimeoutError("uploads to the shared tier did not drain")
                time.sleep(0.1)
        time.sleep(0.5)

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
        runtime = self.workdir / "router"
        conf = runtime / "haproxy.cfg"
        conf.write_text(local([i.port for i in self.instances], self.router_port, self.balance, self.upstream_header))
        if self._router is None:
            # Master-worker mode in the foreground: SIGUSR2 makes the master load the config again.
            out = open(runtime / "haproxy.log", "ab")  # noqa: SIM115 (the process owns it)
            self._router = subprocess.Popen([haproxy_binary(), "-W", "-db", "-f", str(conf)], stdout=out,
                                            stderr=subprocess.STDOUT)
            self._wait_router()
        else:
            self._router.send_signal(signal.SIGUSR2)
            time.sleep(1.0)  # the new worker takes the new ring; the old one finishes its streams

    def _wait_router(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._router is not None
            if self._router.poll() is None:
                try:
                    httpx.get(self.router_url + "/router/metrics", timeout=2)
                    return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"haproxy did not start: {(self.workdir / 'router' / 'haproxy.log').read_text()[-1000:]}")

    def router_metrics(self) -> dict[tuple[str, str], int]:
        """strata_router_requests_total by (server, decision)."""
        counts = {}
        for line in httpx.get(self.router_url + "/router/metrics", timeout=5).text.splitlines():
            m = re.match(r'strata_router_requests_total\{server="([^"]+)",decision="([^"]+)"\} (\d+)', line)
            if m:
                counts[(m[1], m[2])] = int(m[3])
        return counts

    def stop(self) -> None:
        if self._router is not None:
            self._router.terminate()
            self._router.wait(10)
            self._router = None
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
                    help="the router answers with X-Strata-Upstream (the server that answered)")
    ap.add_argument("--balance", choices=["bounded", "consistent", "roundrobin"], default="bounded",
                    help="the router's balancing (default: bounded-load consistent hashing)")
    ap.add_argument("--shared-tier", action="store_true",
                    help="a local redis-server (TLS, password, signed chunks) as every server's --remote-kv")
    ap.add_argument("strata_args", nargs=argparse.REMAINDER, help="after --: flags for every strata server")
    args = ap.parse_args()
    extra = args.strata_args[1:] if args.strata_args[:1] == ["--"] else args.strata_args
    store = RedisServer(args.workdir.resolve() / "redis") if args.shared_tier else None
    cluster = Cluster(args.workdir.resolve(), extra + (store.strata_args() if store else []), args.port,
                      args.upstream_header, args.balance)
    try:
        print(f"starting {args.instances} strata servers ...", flush=True)
        cluster.add(args.instances)
        for inst in cluster.instances:
            print(f"  {inst.name}: {inst.url} (SSD tier {inst.directory / 'ssd'})", flush=True)
        print(f"router (HAProxy, {args.balance}): {cluster.router_url}/v1, decisions at "
              f"{cluster.router_url}/router/metrics  -- Ctrl-C stops", flush=True)
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
