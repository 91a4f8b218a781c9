"""The cluster bench/operator_scale.py runs on: an existing one from an admin kubeconfig, or a throwaway control
plane (tests/kube_cluster.py) with an audit log, optionally next to the tests' real node (cordoned)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the control plane lives with the tests

import apiserver_audit
import kubernetes.client
import kubernetes.config
import yaml
from kubernetes.client.exceptions import ApiException


class ExistingCluster:
    """A cluster from an admin kubeconfig: the few things the harness (tests/operator_support.py) asks of
    tests/kube_cluster.py's KubeCluster."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.config = yaml.safe_load(kubeconfig.read_text())
        client = self.api_client()
        self.server = client.configuration.host
        client.close()

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.config.new_client_from_config(str(self.kubeconfig))

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        from kube_cluster import install_binaries

        return subprocess.run([install_binaries()["LMKUBE_KUBECTL"], "--kubeconfig", str(self.kubeconfig), *args],
                              capture_output=True, text=True, check=True, input=input, timeout=300)

    def apply_crds(self, *paths: Path, timeout: float = 60) -> None:
        with self.api_client() as client:
            extensions = kubernetes.client.ApiextensionsV1Api(client)
            for path in paths:
                for body in yaml.safe_load_all(path.read_text()):
                    try:
                        extensions.create_custom_resource_definition(body, _preload_content=False)
                    except ApiException as error:
                        if error.status != 409:
                            raise
                    wait_for(lambda name=body["metadata"]["name"]: established(extensions, name), timeout,
                             f"CRD {body['metadata']['name']} Established")

    def create_namespace(self, name: str, timeout: float = 60) -> None:
        with self.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)
            core.create_namespace({"metadata": {"name": name}}, _preload_content=False)
            wait_for(lambda: exists(lambda: core.read_namespaced_service_account("default", name)), timeout,
                     f"ServiceAccount {name}/default")

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path, expiration_seconds: int = 3600) -> Path:
        with self.api_client() as client:
            response = kubernetes.client.CoreV1Api(client).create_namespaced_service_account_token(
                name, namespace, {"spec": {"expirationSeconds": expiration_seconds}}, _preload_content=False)
            token = json.loads(response.data)["status"]["token"]
        context = next(c for c in self.config["contexts"] if c["name"] == self.config["current-context"])["context"]
        cluster = next(c for c in self.config["clusters"] if c["name"] == context["cluster"])
        user = f"system:serviceaccount:{namespace}:{name}"
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "bench", "clusters": [cluster],
                  "users": [{"name": user, "user": {"token": token}}],
                  "contexts": [{"name": "bench", "context": {"cluster": cluster["name"], "user": user,
                                                              "namespace": namespace}}]}
        path.write_text(yaml.safe_dump(config))
        return path


def established(extensions: kubernetes.client.ApiextensionsV1Api, name: str) -> bool:
    body = json.loads(extensions.read_custom_resource_definition(name, _preload_content=False).data)
    return any(c["type"] == "Established" and c["status"] == "True"
               for c in body.get("status", {}).get("conditions") or [])


def exists(read: Callable[[], Any]) -> bool:
    try:
        read()
        return True
    except ApiException as error:
        if error.status == 404:
            return False
        raise


def wait_for(done: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> float:
    """Seconds until `done()`; raises after `timeout`."""
    began = time.monotonic()
    while not done():
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - began


@contextmanager
def cluster_from(args: argparse.Namespace) -> Iterator[tuple[Any, Path | None]]:
    """The cluster, and the API server's audit log where the benchmark started the API server."""
    if args.kubeconfig:
        yield ExistingCluster(Path(args.kubeconfig)), None
        return
    import tempfile

    from kube_cluster import REAL_NODE_CONTROLLERS, KubeCluster

    with tempfile.TemporaryDirectory(prefix="lmkube-bench-") as workdir:
        audit_args = apiserver_audit.apiserver_args(Path(workdir))
        audit_log = Path(workdir) / "audit.log"
        (Path(workdir) / "cluster").mkdir()
        if not args.real_node:
            with KubeCluster(workdir=Path(workdir) / "cluster", apiserver_args=audit_args) as cluster:
                yield cluster, audit_log
            return
        from real_node import RealNode

        # The control plane of the tests' real node, with that node (kubelet, containerd, kube-scheduler)
        # cordoned: the scheduler and the node-lifecycle, endpointslice and PV controllers run, the 200 model
        # pods stay Pending (Unschedulable), since 200 servers do not fit on 2 cores.
        with KubeCluster(workdir=Path(workdir) / "cluster", controllers=REAL_NODE_CONTROLLERS,
                         apiserver_args=audit_args) as cluster, \
                RealNode(cluster, Path(workdir) / "node") as node:
            cluster.kubectl("cordon", node.name)
            print(f"real node {node.name} up in {node.start_seconds:.1f}s (cordoned)\n"
                  + cluster.kubectl("get", "nodes", "-o", "wide").stdout, flush=True)
            yield cluster, audit_log
