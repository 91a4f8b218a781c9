"""The Helm chart (charts/lmkube) with real helm (scripts/install-test-cluster.sh builds it) against the real
control plane of tests/kube_cluster.py: lint, schema errors, what the templates render (RBAC = operator/rbac.py,
LocalModels from `models` with `modelDefaults` merged, peering), server-side dry-run of every object, and
`helm install` / `helm uninstall`. The operator actually running from the chart is tests/test_e2e_local.py.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_cluster import ROOT, KubeCluster
from lmkube.operator import rbac
from support import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

CHART = ROOT / "charts" / "lmkube"
CRDS = sorted((CHART / "crds").glob("*.yaml"))

# Every option the chart has, set to something other than its default.
FULL_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/lmkube", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "fullnameOverride": "lmk",
    "serverImage": {"repository": "registry.example.com/lmkube-server", "tag": "1.2.3", "cudaTag": "1.2.3-cu12",
                    "pullPolicy": "IfNotPresent", "port": 8000},
    "operator": {
        "replicas": 2, "watchNamespaces": ["team-a", "team-b"], "healthPort": 9090, "verbose": True,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "ml"}, "podLabels": {"example.com/tier": "ops"},
        "extraEnv": [{"name": "LMKUBE_OPERATOR_RESYNC_SECONDS", "value": "30"}],
    },
    "serviceAccount": {"create": True, "name": "lmkube-op", "annotations": {"example.com/owner": "ml"}},
    "rbac": {"create": True},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
    "modelDefaults": {"gpu": {"count": 1, "resource": "amd.com/gpu"}, "parallel": 8, "ttl": "30m",
                      "storage": {"size": "50Gi", "storageClassName": "fast"}},
    "models": [
        {"name": "qwen", "namespace": "team-a", "model": "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "variant": "q4_k_m",
         "contextLength": 8192, "labels": {"example.com/app": "chat"}, "annotations": {"example.com/note": "x"}},
        {"name": "cpu-small", "namespace": "team-b", "model": "hub-org/Tiny-GGUF", "gpu": {"count": 0},
         "replicas": 0, "parallel": 2, "storage": {"size": "1Gi"},
         "tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"pool": "cpu"}},
    ],
    "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s",
                                   "labels": {"release": "prometheus"}}},
}

# A minimal ServiceMonitor CRD (the Prometheus Operator's is not installed here): lets the apiserver
# validate the chart's ServiceMonitor as an object of a known kind.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "properties": {"spec": {"type": "object",
                                                           "x-kubernetes-preserve-unknown-fields": True}}}}}]},
}


def helm_binary() -> str:
    from kube_cluster import install_binaries

    return install_binaries()["LMKUBE_HELM"]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`helm(*args, check=True)` without a cluster (lint/template), with its own HELM_*_HOME."""
    binary = helm_binary()
    home = tmp_path_factory.mktemp("helm-home")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), **{f"HELM_{k}_HOME": str(home / k.lower())
                                                             for k in ("CACHE", "CONFIG", "DATA")}}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="module")
def full_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "full.yaml"
    path.write_text(yaml.safe_dump(FULL_VALUES))
    return path


def render(helm: Any, *args: str, release: str = "lmkube", namespace: str = "lmkube-system") -> list[dict[str, Any]]:
    out = helm("template", release, str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def is_gateway(doc: dict[str, Any]) -> bool:
    return (doc["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"


def operator_objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The `kind` objects but the gateway's (on by default, tests/test_helm_gateway.py)."""
    return [d for d in objects(docs, kind) if not is_gateway(d)]


def test_lint_is_clean(helm: Any, full_values: Path) -> None:
    for args in ([], ["-f", str(full_values)]):
        result = helm("lint", "--strict", str(CHART), *args)
        assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    # helm is built knowing its Kubernetes version (not v1.20), so Chart.yaml's kubeVersion >=1.27 holds.
    capabilities = helm("template", "x", str(CHART), "--show-only", "templates/NOTES.txt", check=False)
    assert "incompatible with Kubernetes" not in capabilities.stderr
    too_old = helm("template", "x", str(CHART), "--kube-version", "1.26.0", check=False)
    assert too_old.returncode != 0 and "chart requires kubeVersion: >=1.27.0-0" in too_old.stderr


@pytest.mark.parametrize(("values", "message"), [
    ({"replicaCount": 2}, "at '': additional properties 'replicaCount' not allowed"),
    ({"operator": {"watchNamespaces": ["Team_A"]}},
     "at '/operator/watchNamespaces/0': 'Team_A' does not match pattern"),
    ({"operator": {"replicas": -1}}, "at '/operator/replicas': minimum: got -1, want 0"),
    ({"image": {"pullPolicy": "Sometimes"}},
     "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
    ({"models": [{"name": "qwen", "variant": "q4_k_m"}]}, "at '/models/0': missing property 'model'"),
    ({"models": [{"name": "Qwen", "model": "org/repo"}]}, "at '/models/0/name': 'Qwen' does not match pattern"),
    ({"modelDefaults": {"ttl": "soon"}}, "at '/modelDefaults/ttl'"),
    ({"serverImage": {"port": 70000}}, "at '/serverImage/port': maximum: got 70,000, want 65,535"),
])
def test_schema_rejects_bad_values(helm: Any, tmp_path: Path, values: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm("template", "x", str(CHART), "-f", str(path), check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema(s)" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def test_rbac_is_operator_rbac_py(helm: Any, full_values: Path) -> None:
    rules = rbac.rules()
    docs = render(helm)
    (cluster_role,) = operator_objects(docs, "ClusterRole")
    assert cluster_role["rules"] == rules["cluster"] + rules["namespaced"]  # all namespaces: one ClusterRole
    assert operator_objects(docs, "Role") == [] and operator_objects(docs, "RoleBinding") == []
    (binding,) = operator_objects(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"] == "lmkube"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lmkube", "namespace": "lmkube-system"}]
    (account,) = operator_objects(docs, "ServiceAccount")
    assert account["metadata"] == {**account["metadata"], "name": "lmkube", "namespace": "lmkube-system"}

    docs = render(helm, "-f", str(full_values))
    (cluster_role,) = operator_objects(docs, "ClusterRole")
    assert cluster_role["rules"] == rules["cluster"]  # only what is needed cluster-wide
    roles = operator_objects(docs, "Role")
    assert [(r["metadata"]["namespace"], r["rules"]) for r in roles] == [
        ("team-a", rules["namespaced"]), ("team-b", rules["namespaced"])]
    for role_binding in operator_objects(docs, "RoleBinding"):
        assert role_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lmk"}
        assert role_binding["subjects"] == [{"kind": "ServiceAccount", "name": "lmkube-op",
                                             "namespace": "lmkube-system"}]
    assert len(operator_objects(docs, "RoleBinding")) == 2
    # The generated file the chart reads is current.
    assert (CHART / "files" / "operator-rules.yaml").read_text() == rbac.render()
    no_rbac = {d["kind"] for d in render(helm, "--set", "rbac.create=false") if not is_gateway(d)}
    assert no_rbac == {"ServiceAccount", "Deployment"}


def test_operator_deployment_args_env_and_peering(helm: Any, full_values: Path) -> None:
    (deployment,) = operator_objects(render(helm), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "lmkube/lmkube:0.1.0"
    assert container["args"] == ["operator", "--liveness=http://0.0.0.0:8080/healthz", "--standalone"]
    env = {e["name"]: e for e in container["env"]}
    assert env["LMKUBE_OPERATOR_CPU_IMAGE"]["value"] == "lmkube/lmkube:0.1.0"
    assert env["LMKUBE_OPERATOR_CUDA_IMAGE"]["value"] == "lmkube/lmkube:0.1.0-cuda"
    assert env["LMKUBE_OPERATOR_PORT"]["value"] == "1234"
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "LMKUBE_OPERATOR_IMAGE_PULL_POLICY" not in env
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The liveness probe only starts once the start-up probe passed (kopf's start-up can be slow).
    assert container["startupProbe"]["httpGet"] == container["livenessProbe"]["httpGet"] == {
        "path": "/healthz", "port": "health"}
    # The model servers follow image.tag unless serverImage says otherwise.
    (tagged,) = operator_objects(render(helm, "--set", "image.tag=2.0.0"), "Deployment")
    tagged_env = {e["name"]: e.get("value") for e in tagged["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert tagged_env["LMKUBE_OPERATOR_CPU_IMAGE"] == "lmkube/lmkube:2.0.0"
    assert tagged_env["LMKUBE_OPERATOR_CUDA_IMAGE"] == "lmkube/lmkube:2.0.0-cuda"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not objects(render(helm), "ClusterKopfPeering") and not objects(render(helm), "KopfPeering")

    docs = render(helm, "-f", str(full_values))
    (deployment,) = operator_objects(docs, "Deployment")
    assert deployment["metadata"]["name"] == "lmk" and deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/lmkube:1.2.3" and container["imagePullPolicy"] == "Always"
    assert container["args"] == ["operator", "--liveness=http://0.0.0.0:9090/healthz", "--namespace=team-a",
                                 "--namespace=team-b", "--peering=lmk", "--verbose"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LMKUBE_OPERATOR_CPU_IMAGE"] == "registry.example.com/lmkube-server:1.2.3"
    assert env["LMKUBE_OPERATOR_CUDA_IMAGE"] == "registry.example.com/lmkube-server:1.2.3-cu12"
    assert env["LMKUBE_OPERATOR_PORT"] == "8000" and env["LMKUBE_OPERATOR_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert env["LMKUBE_OPERATOR_RESYNC_SECONDS"] == "30"
    assert container["ports"] == [{"name": "health", "containerPort": 9090, "protocol": "TCP"}]
    assert pod["serviceAccountName"] == "lmkube-op" and pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == FULL_VALUES["operator"]["tolerations"]
    assert pod["affinity"] == FULL_VALUES["operator"]["affinity"]
    # Peering: one KopfPeering per watched namespace, named as --peering says.
    assert [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in operator_objects(docs, "KopfPeering")] == [
        ("team-a", "lmk"), ("team-b", "lmk")]
    (peering,) = operator_objects(render(helm, "--set", "operator.replicas=3"), "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "lmkube" and "namespace" not in peering["metadata"]
    (pdb,) = operator_objects(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_models_render_with_defaults_merged(helm: Any, full_values: Path) -> None:
    qwen, cpu = objects(render(helm, "-f", str(full_values)), "LocalModel")
    assert qwen["metadata"]["namespace"] == "team-a" and qwen["metadata"]["labels"]["example.com/app"] == "chat"
    assert qwen["metadata"]["annotations"] == {"example.com/note": "x"}
    assert qwen["spec"] == {"model": "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "variant": "q4_k_m", "contextLength": 8192,
                            "gpu": {"count": 1, "resource": "amd.com/gpu"}, "parallel": 8, "ttl": "30m",
                            "storage": {"size": "50Gi", "storageClassName": "fast"}}
    # An entry's own fields win, zeros included (merge would otherwise treat 0 as unset).
    assert cpu["spec"] == {"model": "hub-org/Tiny-GGUF", "gpu": {"count": 0, "resource": "amd.com/gpu"},
                           "replicas": 0, "parallel": 2, "ttl": "30m",
                           "storage": {"size": "1Gi", "storageClassName": "fast"},
                           "tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"pool": "cpu"}}
    # Default modelDefaults: no ttl, no storageClassName (the cluster's default StorageClass).
    (plain,) = objects(render(helm, "--set", "models[0].name=m", "--set", "models[0].model=org/repo"), "LocalModel")
    assert plain["metadata"]["namespace"] == "lmkube-system"
    assert plain["spec"] == {"model": "org/repo", "gpu": {"count": 1, "resource": "nvidia.com/gpu"},
                             "parallel": 4, "storage": {"size": "20Gi"}}


# -- against the control plane ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    monitor = tmp_path_factory.mktemp("crd") / "servicemonitor.yaml"
    monitor.write_text(json.dumps(SERVICE_MONITOR_CRD))
    kube.apply_crds(*CRDS, monitor)


def test_rendered_objects_pass_server_side_dry_run(kube: KubeCluster, helm: Any, full_values: Path, crds: None,
                                                   tmp_path: Path) -> None:
    suffix = secrets.token_hex(3)
    release_ns, team_a, team_b = f"lmkube-system-{suffix}", f"team-a-{suffix}", f"team-b-{suffix}"
    for namespace in (release_ns, team_a, team_b):  # dry-run still needs the namespaces to exist
        kube.create_namespace(namespace)
    values = json.loads(json.dumps(FULL_VALUES).replace('"team-a"', f'"{team_a}"').replace('"team-b"', f'"{team_b}"'))
    values["fullnameOverride"] = f"lmk-{suffix}"
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    for args in ([], ["-f", str(tmp_path / "values.yaml")]):
        manifest = helm("template", f"dry-{suffix}", str(CHART), "--namespace", release_ns, *args).stdout
        kinds = {doc["kind"] for doc in yaml.safe_load_all(manifest) if doc}
        result = kube.kubectl("apply", "--dry-run=server", "-f", "-", "-o", "name", input=manifest, check=False)
        assert result.returncode == 0, result.stderr
        applied = result.stdout.split()
        assert len(applied) == len([d for d in yaml.safe_load_all(manifest) if d]), result.stdout
        if args:
            assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                    "PodDisruptionBudget", "ServiceMonitor", "KopfPeering", "LocalModel"} <= kinds
    # Nothing was created.
    assert kube.kubectl("get", "deployments,localmodels", "-n", release_ns, "-o", "name").stdout == ""


def test_install_and_uninstall(kube: KubeCluster, crds: None) -> None:
    suffix = secrets.token_hex(3)
    release, namespace, models_ns = f"inst-{suffix}", f"lmkube-inst-{suffix}", f"models-{suffix}"
    kube.create_namespace(models_ns)
    installed = kube.helm("install", release, str(CHART), "--namespace", namespace, "--create-namespace",
                          "--set", f"operator.watchNamespaces={{{models_ns}}}", "--set", "operator.replicas=2",
                          "--set", "podDisruptionBudget.enabled=true",
                          "--set", f"models[0].name=tiny,models[0].namespace={models_ns}",
                          "--set", "models[0].model=hub-org/Tiny-GGUF,models[0].gpu.count=0")
    fullname = f"{release}-lmkube"
    # NOTES.txt: how to apply a first model and reach it, in the watched namespace.
    assert f"manages LocalModels in: {models_ns}." in installed.stdout, installed.stdout
    assert f"kubectl get localmodels -n {models_ns} -w" in installed.stdout
    assert f"kubectl get secret lm-qwen-token -n {models_ns}" in installed.stdout
    assert f"  - {models_ns}/tiny (hub-org/Tiny-GGUF)" in installed.stdout

    def get(kind: str, name: str, ns: str | None = None) -> dict[str, Any] | None:
        result = kube.kubectl("get", kind, name, *(["-n", ns] if ns else []), "-o", "json", check=False)
        if result.returncode != 0:
            assert "NotFound" in result.stderr, result.stderr
            return None
        return json.loads(result.stdout)

    for crd_name in ("localmodels.lmkube.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        assert get("crd", crd_name) is not None
    assert get("serviceaccount", fullname, namespace) is not None
    assert get("clusterrole", fullname)["rules"] == rbac.rules()["cluster"]
    assert get("clusterrolebinding", fullname) is not None
    assert get("role", fullname, models_ns)["rules"] == rbac.rules()["namespaced"]
    assert get("rolebinding", fullname, models_ns) is not None
    assert get("kopfpeering", fullname, models_ns) is not None
    assert get("poddisruptionbudget", fullname, namespace) is not None
    deployment = get("deployment", fullname, namespace)
    assert deployment["spec"]["replicas"] == 2
    # The real controller-manager takes it from there (no pods run: the `kube` control plane has no node).
    wait_until(lambda: kube.kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=operator",
                                    "-o", "name").stdout.count("pod/") == 2,
               timeout=30, message="the operator Deployment's pods created")
    model = get("localmodel", "tiny", models_ns)
    assert model["spec"]["gpu"]["count"] == 0 and model["spec"]["gpu"]["resource"] == "nvidia.com/gpu"
    assert "lmkube.dev/v1alpha1" in kube.helm("get", "manifest", release, "-n", namespace).stdout
    status = json.loads(kube.helm("status", release, "-n", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"

    kube.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s")
    for kind, name, ns in (("serviceaccount", fullname, namespace), ("clusterrole", fullname, None),
                           ("clusterrolebinding", fullname, None), ("role", fullname, models_ns),
                           ("rolebinding", fullname, models_ns), ("kopfpeering", fullname, models_ns),
                           ("deployment", fullname, namespace), ("localmodel", "tiny", models_ns)):
        assert get(kind, name, ns) is None, (kind, name)
    # Helm never deletes CRDs from crds/ (it would delete every LocalModel in the cluster with them).
    assert get("crd", "localmodels.lmkube.dev") is not None
    assert kube.helm("list", "-n", namespace, "-q").stdout.strip() == ""
