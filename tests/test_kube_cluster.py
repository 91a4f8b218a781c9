"""The test control plane itself (tests/kube_cluster.py): a TokenRequest-based ServiceAccount kubeconfig has
exactly that account's RBAC (how the operator subprocess in tests/test_operator_e2e.py runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import pytest
from kube_cluster import KubeCluster
from kubernetes.client.exceptions import ApiException
from support import wait_until


def _try_list(core: kubernetes.client.CoreV1Api, namespace: str) -> dict[str, Any] | None:
    try:
        return json.loads(core.list_namespaced_pod(namespace, _preload_content=False).data)
    except ApiException as error:
        if error.status != 403:
            raise
        return None


def test_service_account_kubeconfig_has_only_its_rbac(kube: KubeCluster, kube_namespace: str, tmp_path: Path) -> None:
    namespace = kube_namespace
    with kube.api_client() as admin:
        core_admin = kubernetes.client.CoreV1Api(admin)
        rbac = kubernetes.client.RbacAuthorizationV1Api(admin)
        core_admin.create_namespaced_service_account(namespace, {"metadata": {"name": "robot"}},
                                                     _preload_content=False)
        path = kube.service_account_kubeconfig(namespace, "robot", tmp_path / "robot.kubeconfig")
        client = kubernetes.config.new_client_from_config(config_file=str(path))
        core = kubernetes.client.CoreV1Api(client)
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_pod(namespace, _preload_content=False)
        assert denied.value.status == 403
        assert f"system:serviceaccount:{namespace}:robot" in denied.value.body

        rbac.create_namespaced_role(namespace, {"metadata": {"name": "pod-reader"}, "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}, _preload_content=False)
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "robot-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}]},
            _preload_content=False)
        listing = wait_until(lambda: _try_list(core, namespace), timeout=60, message="RoleBinding takes effect")
        assert listing["items"] == []
        with pytest.raises(ApiException) as other:  # still nothing outside the Role
            core.list_namespaced_secret(namespace, _preload_content=False)
        assert other.value.status == 403
        client.close()
