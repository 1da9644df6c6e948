"""deploy/: the Kubernetes manifests render (kubectl kustomize) and validate against the Kubernetes schemas
(offline), hold what docs/deploy.md says (volumes, probes, grace period, GPUs, the API key's Secret), and
the router config is the one template, accepted by HAProxy."""

from __future__ import annotations

import base64
import hashlib
import json
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

# What the fallback renderer understands; anything else in the kustomization fails the render instead of
# being left out of it.
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "replicas", "configMapGenerator",
                      "secretGenerator", "patches"}
NAMESPACED_KINDS = {"StatefulSet", "Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy"}


class UnsupportedKustomization(Exception):
    """The kustomization uses something the fallback renderer does not implement: install kubectl."""


def _strict_keys(what: str, node: dict, allowed: set[str]) -> None:
    if not set(node) <= allowed:
        raise UnsupportedKustomization(f"{what}: {sorted(set(node) - allowed)}")


def _kustomize_hash(obj: dict) -> str:
    """kustomize's name suffix for a generated ConfigMap or Secret (api/hasher): sha256 of Go's JSON of
    kind, name, (type,) data; its first 10 hex digits with 0, 1, 3, a, e replaced (no vowels, no look-alikes).
    The name is empty there (its lookup of "metadata/name" finds no field of that name)."""
    fields = {"kind": obj["kind"], "name": "", "data": obj["data"]}
    if obj["kind"] == "Secret":
        fields["type"] = obj["type"]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # as Go escapes them
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _name_references(pod: dict) -> list[tuple[str, dict, str]]:
    """(kind, node, key) of each ConfigMap or Secret name a pod spec refers to, where kustomize's nameReference
    rewrites it; a name anywhere else is left as written, by kustomize and here."""
    refs = []
    for c in pod.get("initContainers", []) + pod["containers"]:
        for env in c.get("env", []):
            source = env.get("valueFrom", {})
            refs += [("Secret", source["secretKeyRef"], "name")] if "secretKeyRef" in source else []
            refs += [("ConfigMap", source["configMapKeyRef"], "name")] if "configMapKeyRef" in source else []
        for source in c.get("envFrom", []):
            refs += [("Secret", source["secretRef"], "name")] if "secretRef" in source else []
            refs += [("ConfigMap", source["configMapRef"], "name")] if "configMapRef" in source else []
    for volume in pod.get("volumes", []):
        refs += [("Secret", volume["secret"], "secretName")] if "secret" in volume else []
        refs += [("ConfigMap", volume["configMap"], "name")] if "configMap" in volume else []
        if "projected" in volume:
            raise UnsupportedKustomization("projected volumes")
    return refs


def _kustomize_subset() -> list[dict]:
    """The part of kustomize this kustomization uses, failing on anything else: file resources, namespace,
    images, replicas, env/file generators (with kustomize's hash suffix and the references to them
    rewritten where kustomize rewrites them), JSON patches that replace existing values."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    _strict_keys("kustomization.yaml", kust, KUSTOMIZATION_KEYS)
    docs = [d for r in kust["resources"] for d in yaml.safe_load_all((K8S / r).read_text()) if d]
    for doc in docs:
        if doc["kind"] != "Namespace" and doc["kind"] not in NAMESPACED_KINDS:
            raise UnsupportedKustomization(f"resource kind {doc['kind']}")

    def env_file(name: str) -> dict[str, str]:
        lines = [ln for ln in (K8S / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not all("=" in ln for ln in lines):
            raise UnsupportedKustomization(f"{name}: a line without '=' (a value from the environment)")
        return dict(ln.split("=", 1) for ln in lines)

    generated = []
    for gen in kust.get("configMapGenerator", []):
        _strict_keys("configMapGenerator", gen, {"name", "envs", "files"})
        data: dict[str, str] = {}
        for name in gen.get("envs", []):
            data |= env_file(name)
        for spec in gen.get("files", []):
            key, _, name = spec.rpartition("=")
            data[key or Path(name).name] = (K8S / name).read_text()
        generated.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in kust.get("secretGenerator", []):
        _strict_keys("secretGenerator", gen, {"name", "envs"})
        data = {k: base64.b64encode(v.encode()).decode() for name in gen["envs"] for k, v in env_file(name).items()}
        generated.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": gen["name"]},
                          "data": data})
    renamed = {}
    for doc in generated:
        base = doc["metadata"]["name"]
        doc["metadata"]["name"] = renamed[doc["kind"], base] = f"{base}-{_kustomize_hash(doc)}"
    docs += generated

    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kust["namespace"]
    for r in kust.get("replicas", []):
        _strict_keys("replicas", r, {"name", "count"})
        targets = [d for d in docs if d["metadata"]["name"] == r["name"] and "replicas" in d.get("spec", {})]
        if not targets:
            raise UnsupportedKustomization(f"replicas of {r['name']}: no such workload")
        for d in targets:
            d["spec"]["replicas"] = r["count"]
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for image in kust.get("images", []):
        _strict_keys("images", image, {"name", "newName", "newTag"})
        for c in (c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]):
            if re.split(r"[:@]", c["image"], maxsplit=1)[0] == image["name"]:
                c["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    for pod in pods:
        for kind, node, key in _name_references(pod):
            node[key] = renamed.get((kind, node[key]), node[key])
    for patch in kust.get("patches", []):
        _strict_keys("patches", patch, {"target", "patch"})
        _strict_keys("patches.target", patch["target"], {"kind", "name"})
        targets = [d for d in docs if (d["kind"], d["metadata"]["name"]) == (patch["target"]["kind"],
                                                                             patch["target"]["name"])]
        if len(targets) != 1:
            raise UnsupportedKustomization(f"patch target {patch['target']}: {len(targets)} matches")
        for op in yaml.safe_load(patch["patch"]):
            _strict_keys("patch operation", op, {"op", "path", "value"})
            if op["op"] != "replace":
                raise UnsupportedKustomization(f"patch operation {op['op']}")
            *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].strip("/").split("/")]
            node = targets[0]
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            key = int(last) if isinstance(node, list) else last
            node[key]  # noqa: B018 (replace needs an existing value: a KeyError or IndexError otherwise)
            node[key] = op["value"]
    return docs


def _rendered() -> list[dict]:
    """`kubectl kustomize` where kubectl is installed; elsewhere the strict subset above."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return _kustomize_subset()
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    """The resource of that kind and name (generated ConfigMaps and Secrets carry kustomize's hash suffix)."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(name + r"(-[a-z0-9]{10})?", d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs])
    return found[0]


def _by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_the_fallback_renders_what_kubectl_kustomize_does():
    """Where kubectl is installed, the subset (used where it is not) renders the same resources: generated
    names with kustomize's hash suffix, the references to them rewritten, images, patches and all."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    assert _by_name(_kustomize_subset()) == _by_name(_rendered())


@pytest.mark.parametrize("change", [
    "namePrefix: prod-\n",  # renames every resource and every reference
    "generatorOptions: {disableNameSuffixHash: true}\n",
    "patches:\n  - target: {kind: Service, name: strata}\n    patch: '[{op: add, path: /spec/x, value: 1}]'\n",
])
def test_the_fallback_refuses_what_it_does_not_implement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         change: str):
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    kust = yaml.safe_load((copy / "kustomization.yaml").read_text()) | yaml.safe_load(change)
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    monkeypatch.setitem(globals(), "K8S", copy)
    with pytest.raises(UnsupportedKustomization):
        _kustomize_subset()


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
    # The API key comes from the generated Secret: the name it was rendered under, hash suffix included.
    key = next(e for e in container["env"] if e["name"] == "STRATA_API_KEY")
    secret = _one(docs, "Secret", "strata-api-key")
    assert re.fullmatch(r"strata-api-key-[a-z0-9]{10}", secret["metadata"]["name"])
    assert key["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_every_config_and_secret_a_pod_names_is_rendered():
    docs = _rendered()
    for name, pod in _pod_specs(docs).items():
        for kind, node, key in _name_references(pod):
            assert (kind, node[key]) in _by_name(docs), (name, kind, node[key])


def test_router_hashes_sessions_over_every_pod(tmp_path: Path):
    docs = _rendered()
    replicas = _one(docs, "StatefulSet", "strata")["spec"]["replicas"]
    data = _one(docs, "ConfigMap", "strata-router")["data"]
    router_config.write_kubernetes(replicas, tmp_path)
    assert data["haproxy.cfg"] == (tmp_path / "router-haproxy.cfg").read_text(), \
        "run: python deploy/router_config.py kubernetes --replicas N"
    assert data["route_decision.lua"] == (tmp_path / "router-route_decision.lua").read_text()
    assert data["route_decision.lua"].endswith(router_config.LUA.read_text())
    conf = data["haproxy.cfg"]
    assert "hash-type consistent" in conf and f"hash-balance-factor {router_config.BALANCE_FACTOR}" in conf
    assert [f"strata-{i}.strata.strata.svc.cluster.local:8000" in conf for i in range(replicas)] == [True] * replicas
    assert f"lua-load {router_config.K8S_LUA_PATH}" in conf


@pytest.mark.parametrize("balance", sorted(router_config.BALANCE))
def test_the_local_router_config_is_accepted_by_haproxy(tmp_path: Path, balance: str):
    from cluster import haproxy_binary

    conf = tmp_path / "haproxy.cfg"
    conf.write_text(router_config.local([18001, 18002, 18003], 18000, balance))
    r = subprocess.run([haproxy_binary(), "-c", "-f", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


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


def test_upstream_header_only_when_asked_for():
    """X-Strata-Upstream names pod addresses: never in the committed config, only where a test asks."""
    assert "X-Strata-Upstream" not in (K8S / "router-haproxy.cfg").read_text()
    assert "X-Strata-Upstream" not in router_config.local([18001], 18000)
    assert "set-header X-Strata-Upstream %si:%sp" in router_config.kubernetes(2, upstream_header=True)


def test_router_closes_idle_connections_before_strata_does():
    from strata.server.http_server import KEEP_ALIVE_S

    conf = (K8S / "router-haproxy.cfg").read_text()
    (client_idle,) = re.findall(r"timeout http-keep-alive (\d+)s", conf)
    (server_idle,) = re.findall(r"pool-purge-delay (\d+)s", conf)
    assert int(client_idle) < KEEP_ALIVE_S and int(server_idle) < KEEP_ALIVE_S
    # A request on a kept-alive connection that the server closed at that moment is tried again.
    assert "retry-on conn-failure empty-response" in conf
