"""Render the router's haproxy.cfg (deploy/haproxy/router.cfg.template) for Kubernetes or for one machine.

    python deploy/router_config.py kubernetes --replicas 2    # writes deploy/kubernetes/router-haproxy.cfg
                                                              # and its copy of route_decision.lua

Balancing (`--balance`): `bounded` (the default: consistent hashing of the route key with bounded loads; a
session moved over the bound finds its KV in the shared tier), `consistent` (the same ring without the
bound: for servers without a shared tier, where a move would recompute) and `roundrobin` (no affinity, for
`make bench-routing`, which compares the three).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
K8S_DIR = HERE / "kubernetes"  # kustomize reads files only from below it: the Lua file is copied there
TEMPLATE = HERE / "haproxy" / "router.cfg.template"
LUA = HERE / "haproxy" / "route_decision.lua"
K8S_NAMESPACE = "strata"
K8S_LUA_PATH = "/usr/local/etc/haproxy/route_decision.lua"
# No server carries more than 1.5x the mean of the requests in flight (HAProxy's recommended range is
# 125-200: lower spreads more sessions away from their KV, higher tolerates more imbalance).
BALANCE_FACTOR = 150
BALANCE = {
    "bounded": f"    balance hdr(X-Strata-Route-Key)\n    hash-type consistent\n"
               f"    hash-balance-factor {BALANCE_FACTOR}",
    "consistent": "    balance hdr(X-Strata-Route-Key)\n    hash-type consistent",
    "roundrobin": "    balance roundrobin",
}
# Which server answered, for tests and debugging only: it tells clients the pods' addresses.
UPSTREAM_HEADER = "    http-response set-header X-Strata-Upstream %si:%sp"


def render(servers: list[str], listen: str, lua_file: str, resolvers: str = "", server_options: str = "",
           balance: str = "bounded", upstream_header: bool = False) -> str:
    """`servers` are addresses; server i is named strata-i (the name the decision metric reports)."""
    values = {
        "LUA_FILE": lua_file,
        "LISTEN": listen,
        "RESOLVERS": resolvers,
        "BALANCE": BALANCE[balance],
        "SERVER_OPTIONS": server_options,
        "UPSTREAM_HEADER": UPSTREAM_HEADER if upstream_header else "",
        "SERVERS": "\n".join(f"    server strata-{i} {address}" for i, address in enumerate(servers)),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def kubernetes(replicas: int, upstream_header: bool = False, balance: str = "bounded") -> str:
    """The StatefulSet's pods by their stable names, re-resolved while the router runs (a restarted pod's
    new address; `init-addr none` lets the router start before every pod exists)."""
    pods = [f"strata-{i}.strata.{K8S_NAMESPACE}.svc.cluster.local:8000" for i in range(replicas)]
    resolvers = "resolvers cluster_dns\n    parse-resolv-conf\n    hold valid 10s\n"
    return render(pods, ":8080", K8S_LUA_PATH, resolvers, "resolvers cluster_dns init-addr none", balance,
                  upstream_header)


def local(ports: list[int], listen_port: int, balance: str = "bounded", upstream_header: bool = False) -> str:
    """Servers on loopback (make cluster, the tests, the routing benchmark)."""
    return render([f"127.0.0.1:{p}" for p in ports], f"127.0.0.1:{listen_port}", str(LUA), balance=balance,
                  upstream_header=upstream_header)


def write_kubernetes(replicas: int, directory: Path = K8S_DIR, upstream_header: bool = False,
                     balance: str = "bounded") -> None:
    (directory / "router-haproxy.cfg").write_text(kubernetes(replicas, upstream_header, balance))
    (directory / "router-route_decision.lua").write_text(
        "-- A copy written by deploy/router_config.py: edit deploy/haproxy/route_decision.lua.\n" + LUA.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["kubernetes"])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--upstream-header", action="store_true",
                    help="answer with X-Strata-Upstream (the pod address that answered): for debugging only")
    ap.add_argument("--balance", choices=sorted(BALANCE), default="bounded",
                    help="bounded (with a shared KV tier), consistent (without one: a move would recompute)")
    args = ap.parse_args()
    write_kubernetes(args.replicas, upstream_header=args.upstream_header, balance=args.balance)


if __name__ == "__main__":
    main()
