"""deploy/: the Kubernetes manifests render (kubectl kustomize) and validate against the Kubernetes schemas
(offline), hold what docs/deploy.md says (volumes, probes, grace period, GPUs, the API key's Secret), and
the router config is the one template, accepted by nginx."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
sys.path.insert(0, str(REPO / "deploy"))
import router_config  # noqa: E402


def _rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomization cannot be rendered here")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


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
