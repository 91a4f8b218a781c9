"""Running the real operator against the test control plane: RBAC from operator/rbac.py, a ServiceAccount
kubeconfig, the `lmkube operator` subprocess, and raw-JSON helpers for LocalModels and their objects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes.client
from kube_cluster import ROOT, KubeCluster
from kubernetes.client.exceptions import ApiException
from lmkube.operator import crd, rbac
from support import free_port

OPERATOR_ACCOUNT = "lmkube-operator"
MERGE_PATCH = "application/merge-patch+json"
CRD_PATH = ROOT / "charts" / "lmkube" / "crds" / crd.CRD_FILE


def install_crd(kube: KubeCluster) -> None:
    kube.kubectl("apply", "-f", str(CRD_PATH))
    kube.kubectl("wait", "--for=condition=Established", f"crd/{crd.NAME}", "--timeout=30s")


def grant_operator_rules(kube: KubeCluster, namespace: str, extra: list[dict[str, Any]] | None = None) -> None:
    """What the chart installs for `watchNamespaces: [namespace]`: a ClusterRole with the cluster rules and a
    Role with the namespaced ones (plus `extra`, e.g. the inferencePool rules), bound to the operator's account."""
    rules = rbac.rules()
    rules["namespaced"] = [*rules["namespaced"], *(extra or [])]
    with kube.api_client() as client:
        core = kubernetes.client.CoreV1Api(client)
        api = kubernetes.client.RbacAuthorizationV1Api(client)
        core.create_namespaced_service_account(namespace, {"metadata": {"name": OPERATOR_ACCOUNT}},
                                               _preload_content=False)
        subject = [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": namespace}]
        name = f"lmkube-operator-{namespace}"
        api.create_cluster_role({"metadata": {"name": name}, "rules": rules["cluster"]}, _preload_content=False)
        api.create_cluster_role_binding({
            "metadata": {"name": name}, "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}},
            _preload_content=False)
        api.create_namespaced_role(namespace, {"metadata": {"name": "lmkube-operator"}, "rules": rules["namespaced"]},
                                   _preload_content=False)
        api.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "lmkube-operator"}, "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lmkube-operator"}},
            _preload_content=False)


class OperatorProcess:
    """`lmkube operator --namespace NS` as a subprocess with the ServiceAccount's kubeconfig."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ("--standalone",)) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.env = env or {}
        self.args = args
        self.health_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "LMKUBE_OPERATOR_POLL_SECONDS": "0.5",
               "LMKUBE_OPERATOR_RESYNC_SECONDS": "3", "LMKUBE_OPERATOR_RETRY_SECONDS": "1", **self.env}
        command = [str(ROOT / ".venv" / "bin" / "lmkube"), "operator", "--namespace", self.namespace, *self.args,
                   "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"]
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self.healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator liveness endpoint not up:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Api:
    """Admin access (the test's own view of the cluster) as raw JSON."""

    def __init__(self, kube: KubeCluster, namespace: str) -> None:
        self.client = kube.api_client()
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.namespace = namespace

    def close(self) -> None:
        self.client.close()

    def create_lm(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name}, "spec": spec}
        return self.custom.create_namespaced_custom_object(crd.GROUP, crd.VERSION, self.namespace, crd.PLURAL, body)

    def lm(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(crd.GROUP, crd.VERSION, self.namespace, crd.PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return (self.lm(name) or {}).get("status") or {}

    def patch_lm(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(crd.GROUP, crd.VERSION, self.namespace, crd.PLURAL, name,
                                                   {"spec": spec}, _content_type=MERGE_PATCH)

    def delete_lm(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(crd.GROUP, crd.VERSION, self.namespace, crd.PLURAL, name)

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        reader: Callable[..., Any] = {
            "Deployment": self.apps.read_namespaced_deployment, "Service": self.core.read_namespaced_service,
            "StatefulSet": self.apps.read_namespaced_stateful_set,
            "Secret": self.core.read_namespaced_secret,
            "PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim,
            "Pod": self.core.read_namespaced_pod,
        }[kind]
        try:
            return json.loads(reader(name, self.namespace, _preload_content=False).data)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pods(self, instance: str) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={instance}"
        items = json.loads(self.core.list_namespaced_pod(self.namespace, label_selector=selector,
                                                         _preload_content=False).data)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def events(self, name: str) -> list[dict[str, Any]]:
        items = json.loads(self.core.list_namespaced_event(self.namespace, _preload_content=False).data)["items"]
        return [e for e in items if e["involvedObject"].get("name") == name
                and e["involvedObject"].get("kind") == crd.KIND]


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})
