"""deploy/: the Kubernetes manifests render (kubectl kustomize) and validate against the Kubernetes schemas
(offline), hold what docs/deploy.md says (volumes, probes, grace period, GPUs, the API key's Secret), and
the router config is the one template, accepted by nginx."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
sys.path.insert(0, str(REPO / "deploy"))
import router_config  # noqa: E402


def _rendered() -> list[dict]:
    """`kubectl kustomize` where kubectl is installed; elsewhere the subset of kustomize this kustomization
    uses (resources, namespace, replicas, env/file generators without hash suffixes, JSON patches)."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for r in kust["resources"] for d in yaml.safe_load_all((K8S / r).read_text()) if d]

    def env_file(name: str) -> dict[str, str]:
        lines = [ln for ln in (K8S / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        return dict(ln.split("=", 1) for ln in lines)

    for gen in kust["configMapGenerator"]:
        data: dict[str, str] = {}
        for name in gen.get("envs", []):
            data |= env_file(name)
        for spec in gen.get("files", []):
            key, _, name = spec.partition("=")
            data[key] = (K8S / name).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in kust["secretGenerator"]:
        data = {k: base64.b64encode(v.encode()).decode() for name in gen["envs"] for k, v in env_file(name).items()}
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": gen["name"]},
                     "data": data})
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kust["namespace"]
        for r in kust["replicas"]:
            if doc["metadata"]["name"] == r["name"] and "replicas" in doc.get("spec", {}):
                doc["spec"]["replicas"] = r["count"]
        for patch in kust["patches"]:
            if (doc["kind"], doc["metadata"]["name"]) == (patch["target"]["kind"], patch["target"]["name"]):
                for op in yaml.safe_load(patch["patch"]):
                    *parents, last = [p.replace("~1", "/") for p in op["path"].strip("/").split("/")]
                    node = doc
                    for part in parents:
                        node = node[int(part)] if isinstance(node, list) else node[part]
                    node[int(last) if isinstance(node, list) else last] = op["value"]
    return docs


def _one(docs: list[dict], kind: str, name: str) -> dict:
    """The resource of that kind and name (generated ConfigMaps and Secrets carry kustomize's hash suffix)."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(name + r"(-[a-z0-9]{10})?", d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs])
    return found[0]


def test_manifests_validate_against_the_kubernetes_schemas():
    docs = _rendered()
    assert {d["kind"] for d in docs} >= {"Namespace", "StatefulSet", "Service", "Deployment", "ConfigMap", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)  # raises on any violation


def test_statefulset_is_what_the_docs_say():
    docs = _rendered()
    sts = _one(docs, "StatefulSet", "strata")
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    headless = _one(docs, "Service", "strata")
    assert headless["spec"]["clusterIP"] == "None" and spec["serviceName"] == headless["metadata"]["name"]
    # Each pod's own PVC is its SSD tier, mounted where the image's entrypoint puts --ssd-dir.
    (claim,) = spec["volumeClaimTemplates"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/strata"
    assert '"--ssd-dir", "/var/lib/strata"' in (REPO / "Dockerfile").read_text()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    config = _one(docs, "ConfigMap", "strata-config")["data"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    drain = float(pre_stop[-1].rsplit("(", 1)[1].rstrip(")"))
    assert pod["terminationGracePeriodSeconds"] >= float(config["STRATA_SHUTDOWN_TIMEOUT"]) + drain
    assert "--shutdown-timeout=$(STRATA_SHUTDOWN_TIMEOUT)" in container["args"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    key = next(e for e in container["env"] if e["name"] == "STRATA_API_KEY")
    secret = _one(docs, "Secret", "strata-api-key")
    assert key["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_router_hashes_sessions_over_every_pod():
    docs = _rendered()
    replicas = _one(docs, "StatefulSet", "strata")["spec"]["replicas"]
    conf = _one(docs, "ConfigMap", "strata-router")["data"]["nginx.conf"]
    assert conf == router_config.kubernetes(replicas), "run: python deploy/router_config.py kubernetes"
    assert "hash $strata_route consistent;" in conf and "proxy_buffering off;" in conf
    assert [f"strata-{i}.strata.strata.svc.cluster.local:8000" in conf for i in range(replicas)] == [True] * replicas
    assert (K8S / "router-nginx.conf").read_text() == conf


def test_the_local_router_config_is_accepted_by_nginx(tmp_path: Path):
    from cluster import nginx_binary

    conf = tmp_path / "nginx.conf"
    conf.write_text(router_config.local([18001, 18002, 18003], 18000, tmp_path))
    r = subprocess.run([nginx_binary(), "-t", "-c", str(conf), "-e", str(tmp_path / "error.log")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")}


def test_pods_run_unprivileged_on_a_read_only_root():
    for name, pod in _pod_specs(_rendered()).items():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in pod["containers"] + pod.get("initContainers", []):
            where = (name, c["name"])
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
        for c in pod["containers"]:  # what a long-running container writes goes to a volume, /tmp included
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/tmp") in empty_dirs, (name, c["name"])


def test_grace_period_covers_drain_requests_and_flush():
    docs = _rendered()
    pod = _one(docs, "StatefulSet", "strata")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    drain = float(container["lifecycle"]["preStop"]["exec"]["command"][-1].rsplit("(", 1)[1].rstrip(")"))
    shutdown = float(_one(docs, "ConfigMap", "strata-config")["data"]["STRATA_SHUTDOWN_TIMEOUT"])
    # After the preStop drain, SIGTERM: in-flight requests get --shutdown-timeout, then the write-back of
    # the tiers to the SSD gets it again (strata/server/app.py's lifespan).
    assert pod["terminationGracePeriodSeconds"] >= drain + 2 * shutdown


def test_no_api_key_is_committed():
    """The committed Secret holds a placeholder that the pods' init container refuses; a generated key
    passes."""
    import os
    import secrets

    docs = _rendered()
    committed = base64.b64decode(_one(docs, "Secret", "strata-api-key")["data"]["STRATA_API_KEY"]).decode()
    pod = _one(docs, "StatefulSet", "strata")["spec"]["template"]["spec"]
    (check,) = pod["initContainers"]
    assert check["env"] == next(c for c in pod["containers"] if c["name"] == "strata")["env"]

    def refused(key: str) -> bool:
        command = [sys.executable if check["command"][0] == "python" else check["command"][0], *check["command"][1:]]
        return subprocess.run(command, env={**os.environ, "STRATA_API_KEY": key}, capture_output=True).returncode != 0

    assert refused(committed) and refused("") and refused(secrets.token_hex(32) + ",short")
    assert not refused(secrets.token_hex(32)) and not refused(f"{secrets.token_hex(16)},{secrets.token_hex(16)}")


def test_network_policies_admit_only_the_router_to_strata_and_only_strata_to_redis():
    docs = _rendered()
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs
              if d["kind"] in ("Deployment", "StatefulSet")}
    assert set(labels) == {"strata", "strata-router"}
    for policy, target, source, port in (("strata", labels["strata"], labels["strata-router"], 8000),
                                         ("redis", {"app.kubernetes.io/name": "redis"}, labels["strata"], 6379)):
        spec = _one(docs, "NetworkPolicy", policy)["spec"]
        assert spec["podSelector"]["matchLabels"] == target and spec["policyTypes"] == ["Ingress"], policy
        (rule,) = spec["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": source}}], policy
        assert rule["ports"] == [{"protocol": "TCP", "port": port}], policy


def test_upstream_header_only_when_asked_for(tmp_path: Path):
    """X-Strata-Upstream names pod addresses: never in the committed config, only where a test asks."""
    assert "X-Strata-Upstream" not in (K8S / "router-nginx.conf").read_text()
    assert "X-Strata-Upstream" not in router_config.local([18001], 18000, tmp_path)
    assert "add_header X-Strata-Upstream $upstream_addr always;" in router_config.kubernetes(2, upstream_header=True)


def test_router_closes_idle_connections_before_strata_does():
    from strata.server.http_server import KEEP_ALIVE_S

    conf = (K8S / "router-nginx.conf").read_text()
    timeouts = [int(t) for t in re.findall(r"keepalive_timeout (\d+)s;", conf)]
    assert len(timeouts) == conf.count("\n    upstream ") == 2
    assert max(timeouts) < KEEP_ALIVE_S
