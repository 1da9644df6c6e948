"""Render the router's nginx.conf (deploy/nginx/router.conf.template) for Kubernetes or for one machine.

    python deploy/router_config.py kubernetes --replicas 2 > deploy/kubernetes/router-nginx.conf
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx" / "router.conf.template"
K8S_NAMESPACE = "strata"


def render(servers: list[str], listen: str, runtime_dir: str, error_log: str, access_log: str,
           resolver: str | None = None) -> str:
    """With a resolver, server names are re-resolved while nginx runs (that needs a shared-memory zone)."""
    text = TEMPLATE.read_text()
    values = {
        "SERVERS": "\n".join(f"        server {s};" for s in servers),
        "LISTEN": listen,
        "RUNTIME_DIR": runtime_dir,
        "ERROR_LOG": error_log,
        "ACCESS_LOG": access_log,
        "RESOLVER": f"    resolver {resolver} valid=10s;" if resolver else "",
        "ZONE": "        zone strata 1m;" if resolver else "",
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def kubernetes(replicas: int) -> str:
    """The StatefulSet's pods by their stable names; `resolve` (nginx >= 1.27.3) follows a restarted pod's
    new address and lets the router start before every pod exists."""
    pods = [f"strata-{i}.strata.{K8S_NAMESPACE}.svc.cluster.local:8000 resolve max_fails=1 fail_timeout=5s"
            for i in range(replicas)]
    return render(pods, "8080", "/tmp", "/dev/stderr", "/dev/stdout",
                  resolver="kube-dns.kube-system.svc.cluster.local")


def local(ports: list[int], listen_port: int, runtime_dir: Path) -> str:
    """Servers on loopback (make cluster, the tests)."""
    return render([f"127.0.0.1:{p} max_fails=1 fail_timeout=5s" for p in ports], f"127.0.0.1:{listen_port}",
                  str(runtime_dir), str(runtime_dir / "error.log"), str(runtime_dir / "access.log"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["kubernetes"])
    ap.add_argument("--replicas", type=int, default=2)
    args = ap.parse_args()
    print(kubernetes(args.replicas), end="")


if __name__ == "__main__":
    main()
