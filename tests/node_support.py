"""What tests on the real node (tests/real_node.py) share: the model cache volumes pods mount, their logs,
the addresses a Service routes to, and an in-cluster client pod.

Volumes are statically provisioned, as an administrator without a storage provisioner would: one hostPath
PersistentVolume per claim, pre-bound to it through `claimRef`, bound by kube-controller-manager's
persistentvolume-binder. The directory belongs to uid 1000 (fsGroup does not apply to hostPath volumes).

There is no cluster DNS on the test node. The operator reaches its pods by pod IP (as it does in any
cluster), and a client pod that calls `status.endpoint` (`http://<service>.<namespace>.svc:<port>`) gets that
name from `hostAliases`, pointing at the Service's ClusterIP: the kubelet writes it into the pod's
/etc/hosts, and kube-proxy routes the ClusterIP as it would for a name CoreDNS had resolved.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import pytest
from kube_cluster import KubeCluster
from operator_support import grant_operator_rules, install_crd
from real_node import RealNode
from support import wait_until

PV_LABEL = "lmkube-test/namespace"
RUN_AS = 1000  # the image's user (operator/resources.py RUN_AS)
VENV_PYTHON = "/opt/lmkube/bin/python"
# Generous: a busy 2-core machine shared with other work, pods of a ~1 GB image starting a Python server.
POD_TIMEOUT = 300


@pytest.fixture(scope="module")
def kube(real_node: RealNode) -> KubeCluster:
    """The real node's control plane (a module that imports this has no use for the session's node-less one)."""
    return real_node.cluster


@pytest.fixture(scope="module")
def node_namespace(real_node: RealNode, kube: KubeCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace named after the test module, with the CRD and the operator's RBAC; deleted after the module,
    with the volumes provided for it."""
    name = f"{request.module.__name__.removeprefix('test_').replace('_', '-')[:40]}-{secrets.token_hex(3)}"
    install_crd(kube)
    kube.create_namespace(name)
    grant_operator_rules(kube, name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
    delete_volumes(real_node, name)


def provide_volume(node: RealNode, namespace: str, claim: str, access_mode: str = "ReadWriteOnce",
                   size: str = "1Gi") -> Path:
    """A hostPath PersistentVolume pre-bound to claim `namespace/claim`; returns its directory on the host."""
    directory = node.paths.root / "volumes" / f"{namespace}-{claim}"
    directory.mkdir(parents=True, exist_ok=True)
    os.chown(directory, RUN_AS, RUN_AS)
    volume = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{claim}"[:253], "labels": {PV_LABEL: namespace}},
        "spec": {"capacity": {"storage": size}, "accessModes": [access_mode],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "hostPath": {"path": str(directory), "type": "Directory"},
                 "claimRef": {"namespace": namespace, "name": claim}},
    }
    node.cluster.kubectl("apply", "-f", "-", input=json.dumps(volume))
    return directory


def delete_volumes(node: RealNode, namespace: str) -> None:
    node.cluster.kubectl("delete", "pv", "-l", f"{PV_LABEL}={namespace}", "--wait=false", check=False)


def service_addresses(node: RealNode, namespace: str, service: str) -> list[str]:
    """The ready pod IPs in the Service's EndpointSlices (what kube-proxy routes its ClusterIP to)."""
    slices = json.loads(node.cluster.kubectl("get", "endpointslices", "-n", namespace, "-l",
                                             f"kubernetes.io/service-name={service}", "-o", "json").stdout)
    return sorted({address for item in slices["items"] for endpoint in item.get("endpoints") or []
                   if (endpoint.get("conditions") or {}).get("ready") for address in endpoint["addresses"]})


def pod_log(node: RealNode, namespace: str, pod: str, previous: bool = False) -> str:
    result = node.cluster.kubectl("logs", pod, "-n", namespace, *(["--previous"] if previous else []), check=False)
    return result.stdout + result.stderr


class LogFollower:
    """`kubectl logs -f` of one pod into a file: what it printed is still there after the pod is deleted."""

    def __init__(self, node: RealNode, namespace: str, pod: str, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] = path.open("wb")
        self._process = subprocess.Popen([*node.cluster.kubectl_args, "logs", "-f", pod, "-n", namespace],
                                         stdout=self._file, stderr=subprocess.STDOUT, env=node.cluster.env)

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def stop(self) -> str:
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._file.close()
        return self.text()


def client_pod(name: str, namespace: str, image: str, endpoint: str, cluster_ip: str, script: str,
               env: list[dict[str, Any]]) -> dict[str, Any]:
    """A pod of the project image running `script` against `endpoint`, whose host name resolves (hostAliases)
    to the Service's ClusterIP. Hardened like the model servers: uid 1000, read-only root filesystem."""
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsUser": RUN_AS, "runAsGroup": RUN_AS, "runAsNonRoot": True},
            "hostAliases": [{"ip": cluster_ip, "hostnames": [urlparse(endpoint).hostname]}],
            "containers": [{
                "name": "client", "image": image, "imagePullPolicy": "Never",
                "command": [VENV_PYTHON, "-c", script],
                "env": [{"name": "LMKUBE_ENDPOINT", "value": endpoint}, *env],
                "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


# The in-cluster client: a chat completion at status.endpoint with the token from the model's Secret.
CHAT_CLIENT = """
import json, os, httpx
base = os.environ["LMKUBE_ENDPOINT"]
anonymous = httpx.get(base + "/v1/models", timeout=60).status_code
reply = httpx.post(base + "/v1/chat/completions", timeout=240,
                   headers={"Authorization": "Bearer " + os.environ["LMKUBE_TOKEN"]},
                   json={"model": os.environ["LMKUBE_MODEL"], "max_tokens": 8,
                         "messages": [{"role": "user", "content": "Say hello."}]})
print(json.dumps({"anonymous": anonymous, "status": reply.status_code, "body": reply.json()}))
"""


def run_client(node: RealNode, manifest: dict[str, Any], timeout: float = POD_TIMEOUT) -> dict[str, Any]:
    """Runs a client pod to completion and returns the JSON its last log line holds."""
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    node.cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def finished() -> str | None:
        pod = json.loads(node.cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)
        phase = pod["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until(finished, timeout=timeout, interval=1, message=f"client pod {name} did not finish")
    logs = pod_log(node, namespace, name)
    assert phase == "Succeeded", logs[-4000:]
    return json.loads(logs.strip().splitlines()[-1])
