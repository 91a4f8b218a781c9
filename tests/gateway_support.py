"""A real `lmkube gateway` process for tests: fixed replicas from a backends file (rewritten while it runs to
add or drop replicas), keys from a keys file; or discovery from a control plane, as a ServiceAccount with the
chart's gateway permissions (`gateway_account`) and keys in labelled Secrets (`gateway_key`)."""

from __future__ import annotations

import base64
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import kubernetes.client
import yaml
from kube_cluster import KubeCluster
from lmkube.operator import crd
from support import LMKUBE, ListeningProcess, free_port

# The chart's gateway rules in one namespace: watch LocalModels and pods, and (the keys) list Secrets.
WATCH = [{"apiGroups": [crd.GROUP], "resources": [crd.PLURAL], "verbs": ["get", "list", "watch"]},
         {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
         {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}]


@dataclass
class GatewayProcess(ListeningProcess):
    command: ClassVar[str] = "lmkube gateway"


def start_gateway(workdir: Path, *args: str, env: dict[str, str] | None = None) -> GatewayProcess:
    port = free_port()
    log_path = workdir / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([LMKUBE, "gateway", "--host", "127.0.0.1", "--port", str(port), *args],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    gateway = GatewayProcess(process, port, log_path)
    try:
        gateway.wait_ready()
    except BaseException:
        gateway.stop()
        raise
    return gateway


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    """Writes atomically, so the gateway's file follower never reads half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(document))
    partial.replace(path)
    return path


def gateway_account(kube: KubeCluster, namespace: str, kubeconfig: Path, name: str = "gateway",
                    rules: list[dict[str, Any]] | None = None) -> Path:
    """A ServiceAccount with only `rules` (default WATCH) in `namespace`; returns a kubeconfig logged in as it."""
    kube.kubectl("create", "serviceaccount", name, "-n", namespace)
    with kube.api_client() as client:
        rbac = kubernetes.client.RbacAuthorizationV1Api(client)
        rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules or WATCH})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
    return kube.service_account_kubeconfig(namespace, name, kubeconfig)


def gateway_key(api: Any, namespace: str, name: str, key: str, **fields: str) -> None:
    """A gateway key: a Secret labelled lmkube.dev/gateway-key with `key` and `fields` (namespaces, models, ...)."""
    data = {k: base64.b64encode(v.encode()).decode() for k, v in {"key": key, **fields}.items()}
    kubernetes.client.CoreV1Api(api).create_namespaced_secret(namespace, {
        "metadata": {"name": name, "labels": {"lmkube.dev/gateway-key": "true"}}, "data": data})
