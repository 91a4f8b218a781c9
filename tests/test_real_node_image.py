"""The project's own image on the real node: the CPU image from scripts/build-image.sh, imported into the
node's containerd, serves a model as a hardened pod (uid 1000, fsGroup on its volumes, read-only root
filesystem, the kubelet's readiness probe on /health), and an in-cluster client pod of the same image reaches
it through a ClusterIP Service with the API token from a Secret.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import pytest
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from support import CHAT_MODEL, wait_until

pytestmark = pytest.mark.image

# A cold import of the image (~1 GB) and a model loading on a busy 2-core machine.
POD_TIMEOUT = 300
VENV_PYTHON = "/opt/lmkube/bin/python"
HARDENED = {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}}
# The model is generated inside the pod (the image carries lmkube.synthetic_gguf): nothing is fetched.
WRITE_MODEL = ("from pathlib import Path; from lmkube.synthetic_gguf import write_llama_model; "
               f"write_llama_model(Path('/models/{CHAT_MODEL}/tiny-chat-F16.gguf'), dtype='f16', seed=1, "
               "name='Tiny Chat')")
# The in-cluster client: finds the Services through the kubelet's service environment variables.
CLIENT = """
import json, os, ssl, urllib.request, httpx
# The apiserver, as an operator pod reaches it: the kubernetes Service, the ServiceAccount's token and CA.
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
api = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}/version"
request = urllib.request.Request(api, headers={"Authorization": "Bearer " + open(sa + "/token").read()})
context = ssl.create_default_context(cafile=sa + "/ca.crt")
kubernetes = json.load(urllib.request.urlopen(request, context=context, timeout=60))["gitVersion"]
base = f"http://{os.environ['LMKUBE_SERVICE_HOST']}:{os.environ['LMKUBE_SERVICE_PORT']}"
anonymous = httpx.get(base + "/v1/models", timeout=60)
reply = httpx.post(base + "/v1/chat/completions", timeout=240,
                   headers={"Authorization": "Bearer " + os.environ["LMKUBE_TOKEN"]},
                   json={"model": os.environ["LMKUBE_MODEL"], "max_tokens": 8,
                         "messages": [{"role": "user", "content": "hi"}]})
print(json.dumps({"kubernetes": kubernetes, "anonymous": anonymous.status_code,
                  "status": reply.status_code, "body": reply.json()}))
"""


def _token_env() -> dict[str, Any]:
    return {"name": "LMKUBE_TOKEN", "valueFrom": {"secretKeyRef": {"name": "lmkube-token", "key": "token"}}}


def _server(namespace: str, image: str) -> list[dict[str, Any]]:
    labels = {"app": "lmkube"}
    volumes = [{"name": "models", "emptyDir": {}}, {"name": "home", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "models", "mountPath": "/models"}, {"name": "home", "mountPath": "/home/lmkube"},
              {"name": "tmp", "mountPath": "/tmp"}]
    container = {"image": image, "imagePullPolicy": "Never", "securityContext": HARDENED, "volumeMounts": mounts,
                 "env": [{"name": "LMKUBE_HOME", "value": "/home/lmkube"}, _token_env()]}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "lmkube", "namespace": namespace},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {
                 "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "runAsNonRoot": True},
                 "volumes": volumes,
                 "initContainers": [{**container, "name": "model", "command": [VENV_PYTHON, "-c", WRITE_MODEL]}],
                 "containers": [{
                     **container, "name": "server",
                     "args": ["serve", "--host", "0.0.0.0", "--port", "1234", "--models-dir", "/models",
                              "--threads", "1", "--api-token", "$(LMKUBE_TOKEN)"],
                     "ports": [{"name": "http", "containerPort": 1234}],
                     "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2},
                 }],
             }}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lmkube", "namespace": namespace},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]}},
    ]


@pytest.mark.timeout(BUILD_TIMEOUT + 900)  # a source change rebuilds the image first (minutes, vfs storage)
def test_project_image_serves_an_in_cluster_client(real_node: RealNode, node_image: str, namespace: str) -> None:
    kubectl = real_node.cluster.kubectl
    token = "sk-node-" + secrets.token_hex(8)
    kubectl("create", "secret", "generic", "lmkube-token", "-n", namespace, f"--from-literal=token={token}")
    for manifest in _server(namespace, node_image):
        kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def ready_pod() -> dict[str, Any] | None:
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", "app=lmkube", "-o", "json").stdout)["items"]
        return next((p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                            for c in p["status"].get("conditions") or [])), None)

    pod = wait_until(ready_pod, timeout=POD_TIMEOUT, interval=1, message="the server pod never became Ready")
    server = pod["status"]["containerStatuses"][0]
    assert server["imageID"] and server["image"].endswith(node_image.rsplit("/", 1)[-1]), server
    secret = json.loads(kubectl("get", "secret", "lmkube-token", "-n", namespace, "-o", "json").stdout)
    assert base64.b64decode(secret["data"]["token"]).decode() == token

    client = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": namespace},
              "spec": {"restartPolicy": "Never", "securityContext": {"runAsUser": 1000, "runAsNonRoot": True},
                       "containers": [{"name": "client", "image": node_image, "imagePullPolicy": "Never",
                                       "securityContext": HARDENED, "command": [VENV_PYTHON, "-c", CLIENT],
                                       "env": [_token_env(), {"name": "LMKUBE_MODEL", "value": CHAT_MODEL}]}]}}
    kubectl("apply", "-f", "-", input=json.dumps(client))
    wait_until(lambda: json.loads(kubectl("get", "pod", "client", "-n", namespace, "-o", "json").stdout)["status"]
               .get("phase") in ("Succeeded", "Failed"), timeout=POD_TIMEOUT, interval=1)
    logs = kubectl("logs", "client", "-n", namespace).stdout
    result = json.loads(logs.strip().splitlines()[-1])
    assert result["kubernetes"] == "v1.37.2", result
    assert result["anonymous"] == 401, result
    assert result["status"] == 200, result
    assert result["body"]["object"] == "chat.completion" and result["body"]["model"] == CHAT_MODEL, result
    assert result["body"]["usage"]["completion_tokens"] >= 1, result
