"""The chart's gateway (gateway.enabled, on by default): Deployment, Service, PodDisruptionBudget, credential
and RBAC, as rendered by the real helm and accepted by a real kube-apiserver (server-side dry run)."""

from __future__ import annotations

import secrets
from typing import Any

from kube_cluster import KubeCluster
from test_helm_chart import CHART, helm, objects, render

__all__ = ["helm"]  # the fixture, shared with test_helm_chart.py

ON = ("--set", "gateway.enabled=true")
OFF = ("--set", "gateway.enabled=false")
READ = ["get", "list", "watch"]


def gateway_objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in objects(docs, kind)
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "gateway"]


def test_gateway_deployment_service_pdb_and_credential(helm: Any) -> None:
    def names(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(d["kind"], d["metadata"]["name"]) for d in docs]

    assert names(render(helm)) == names(render(helm, *ON))  # on by default
    off = render(helm, *OFF)
    assert not [d for d in off if "gateway" in d["metadata"]["name"]]
    (alone,) = objects(off, "Deployment")  # and the operator gets no gateway credential
    env = alone["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "LMKUBE_OPERATOR_GATEWAY_TOKEN" not in {e["name"] for e in env}
    docs = render(helm, *ON)
    (deployment,) = gateway_objects(docs, "Deployment")
    assert deployment["metadata"]["name"] == "lmkube-gateway" and deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["gateway", "--port=8080", "--keys-namespace=lmkube-system", "--drain-seconds=30"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["serviceAccountName"] == "lmkube-gateway"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    (service,) = gateway_objects(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    (pdb,) = gateway_objects(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": deployment["spec"]["selector"]}
    # One credential: the gateway sends it, the operator hands it to the model-server pods.
    (credential,) = gateway_objects(docs, "Secret")
    env = {e["name"]: e for e in container["env"]}
    assert env["LMKUBE_GATEWAY_UPSTREAM_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": credential["metadata"]["name"], "key": "token"}
    (operator,) = [d for d in objects(docs, "Deployment") if d is not deployment]
    operator_env = {e["name"]: e for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert operator_env["LMKUBE_OPERATOR_GATEWAY_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": credential["metadata"]["name"], "key": "token"}
    assert len(credential["data"]["token"]) >= 48


def test_gateway_rbac_reads_no_secret_outside_its_namespace(helm: Any) -> None:
    docs = render(helm, *ON)
    (cluster_role,) = gateway_objects(docs, "ClusterRole")  # all namespaces: LocalModels and pods only
    assert cluster_role["rules"] == [{"apiGroups": ["lmkube.dev"], "resources": ["localmodels"], "verbs": READ},
                                     # Scale from zero: spec.replicas through the scale subresource, nothing else.
                                     {"apiGroups": ["lmkube.dev"], "resources": ["localmodels/scale"],
                                      "verbs": ["get", "patch"]},
                                     {"apiGroups": [""], "resources": ["pods"], "verbs": READ}]
    (keys,) = gateway_objects(docs, "Role")
    assert keys["metadata"]["namespace"] == "lmkube-system"
    assert keys["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}]
    # Some namespaces (its own list, else the operator's): a Role in each, no ClusterRole.
    for values in ("gateway.namespaces={team-a,team-b}", "operator.watchNamespaces={team-a,team-b}"):
        docs = render(helm, *ON, "--set", values)
        assert gateway_objects(docs, "ClusterRole") == []
        roles = [r for r in gateway_objects(docs, "Role") if r["metadata"]["name"] == "lmkube-gateway"]
        assert [r["metadata"]["namespace"] for r in roles] == ["team-a", "team-b"]
        (deployment,) = gateway_objects(docs, "Deployment")
        assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == [
            "--namespace=team-a", "--namespace=team-b"]


def test_gateway_objects_pass_server_side_dry_run(kube: KubeCluster, helm: Any) -> None:
    namespace = f"lmkube-gw-{secrets.token_hex(3)}"
    kube.create_namespace(namespace)
    manifest = helm("template", "dry", str(CHART), "--namespace", namespace, *ON).stdout
    result = kube.kubectl("apply", "--dry-run=server", "-f", "-", "-o", "name", input=manifest, check=False)
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/dry-lmkube-gateway" in result.stdout.split()
