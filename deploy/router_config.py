"""Render the router's nginx.conf (deploy/nginx/router.conf.template) for Kubernetes or for one machine.

    python deploy/router_config.py kubernetes --replicas 2 > deploy/kubernetes/router-nginx.conf
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx" / "router.conf.template"
K8S_NAMESPACE = "strata"
# A server that refused or dropped a connection, timed out, or answered 502/503 (dead, draining, not ready)
# is left out of the ring for 5 s; its sessions go to the next server meanwhile.
DOWN = "max_fails=1 fail_timeout=5s"
# The spill ring only ever sees requests some server refused with 429: never mark a server down there.
SPILL = "max_fails=0"
# Which server answered (and which were tried before), for tests and debugging only: it tells clients the
# pods' addresses.
UPSTREAM_HEADER = "        add_header X-Strata-Upstream $upstream_addr always;\n"


def render(servers: list[str], listen: str, runtime_dir: str, error_log: str, access_log: str,
           resolver: str | None = None, upstream_header: bool = False) -> str:
    """`servers` are addresses (with `resolve` where nginx re-resolves them while it runs, which needs a
    resolver and a shared-memory zone)."""
    text = TEMPLATE.read_text()
    values = {
        "SERVERS": "\n".join(f"        server {s} {DOWN};" for s in servers),
        "SPILL_SERVERS": "\n".join(f"        server {s} {SPILL};" for s in servers),
        "LISTEN": listen,
        "RUNTIME_DIR": runtime_dir,
        "ERROR_LOG": error_log,
        "ACCESS_LOG": access_log,
        "RESOLVER": f"    resolver {resolver} valid=10s;" if resolver else "",
        "ZONE": "        zone strata 1m;" if resolver else "",
        "SPILL_ZONE": "        zone strata_spill 1m;" if resolver else "",
        "UPSTREAM_HEADER": UPSTREAM_HEADER if upstream_header else "",
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def kubernetes(replicas: int, upstream_header: bool = False) -> str:
    """The StatefulSet's pods by their stable names; `resolve` (nginx >= 1.27.3) follows a restarted pod's
    new address and lets the router start before every pod exists."""
    pods = [f"strata-{i}.strata.{K8S_NAMESPACE}.svc.cluster.local:8000 resolve" for i in range(replicas)]
    return render(pods, "8080", "/tmp", "/dev/stderr", "/dev/stdout",
                  resolver="kube-dns.kube-system.svc.cluster.local", upstream_header=upstream_header)


def local(ports: list[int], listen_port: int, runtime_dir: Path, upstream_header: bool = False) -> str:
    """Servers on loopback (make cluster, the tests)."""
    return render([f"127.0.0.1:{p}" for p in ports], f"127.0.0.1:{listen_port}", str(runtime_dir),
                  str(runtime_dir / "error.log"), str(runtime_dir / "access.log"), upstream_header=upstream_header)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["kubernetes"])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--upstream-header", action="store_true",
                    help="answer with X-Strata-Upstream (the pod addresses tried): for debugging only")
    args = ap.parse_args()
    print(kubernetes(args.replicas, args.upstream_header), end="")


if __name__ == "__main__":
    main()
