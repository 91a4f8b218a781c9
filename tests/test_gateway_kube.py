"""`lmkube gateway` discovering LocalModels, their ready pods and its keys from a real kube-apiserver, and
following them as they change. It runs as a ServiceAccount with only the chart's gateway permissions (watch
LocalModels and pods in the namespace it serves, list/watch Secrets in its own), reaching real `lmkube serve`
processes at the pod IPs the test writes into the pods' status (127.0.0.1 and the server's port as the
container port named `http`: the pods have no node, the status is what a kubelet would report). Out of a
cluster it logs in with a kubeconfig: a token, or an exec credential plugin (EKS, GKE style).
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes.client
import pytest
import yaml
from gateway_support import GatewayProcess, gateway_account, gateway_key, start_gateway
from kube_cluster import ROOT, KubeCluster
from lmkube.operator import crd
from lmkube.operator.resources import labels
from support import ServerProcess, wait_until

UPSTREAM = secrets.token_hex(16)
KEY = f"gw-{secrets.token_hex(12)}"
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def replicas(start_server: Any, models_dir: Path) -> list[ServerProcess]:
    return [start_server(models_dir, "--no-auto-evict", "--api-token", UPSTREAM, token=UPSTREAM) for _ in range(2)]


@pytest.fixture
def api(kube: KubeCluster) -> Any:
    kube.apply_crds(ROOT / "charts" / "lmkube" / "crds" / "localmodels.lmkube.dev.yaml")
    with kube.api_client() as client:
        yield client


def local_model(api: Any, namespace: str, name: str, model_key: str, aliases: list[str]) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(crd.GROUP, crd.VERSION, namespace, crd.PLURAL, {
        "apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name},
        "spec": {"model": model_key, "aliases": aliases, "gpu": {"count": 0}}})
    custom.patch_namespaced_custom_object_status(crd.GROUP, crd.VERSION, namespace, crd.PLURAL, name,
                                                 {"status": {"modelKey": model_key, "phase": "Ready"}})


def pod(api: Any, namespace: str, name: str, model: str, server: ServerProcess, ready: bool = True) -> None:
    core = kubernetes.client.CoreV1Api(api)
    body = {"metadata": {"name": name, "labels": labels(model)},
            "spec": {"containers": [{"name": "lmkube", "image": "lmkube/lmkube:test",
                                     "ports": [{"name": "http", "containerPort": server.port}]}]}}
    if core.list_namespaced_pod(namespace, field_selector=f"metadata.name={name}").items == []:
        core.create_namespaced_pod(namespace, body)
    set_ready(api, namespace, name, ready)


def set_ready(api: Any, namespace: str, name: str, ready: bool) -> None:
    status = {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    kubernetes.client.CoreV1Api(api).patch_namespaced_pod_status(name, namespace, {"status": status})


def chat(gw: GatewayProcess, model: str, key: str = KEY, content: str = "Hello") -> httpx.Response:
    return httpx.post(f"{gw.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2})


def test_discovers_and_follows_local_models_pods_and_keys(
        kube: KubeCluster, api: Any, kube_namespace: str, replicas: list[ServerProcess],
        tmp_path: Path) -> None:
    ns = kube_namespace
    kubeconfig = gateway_account(kube, ns, tmp_path / "kubeconfig")
    local_model(api, ns, "chat", "acme/tiny-chat", ["tiny"])
    pod(api, ns, "chat-a", "chat", replicas[0])
    gateway_key(api, ns, "team", KEY, namespaces=ns)
    (tmp_path / "upstream").write_text(UPSTREAM)
    gw = start_gateway(tmp_path, "--namespace", ns, "--keys-namespace", ns, "--upstream-token-file",
                       str(tmp_path / "upstream"), env={"KUBECONFIG": str(kubeconfig)})
    try:
        answer = chat(gw, "tiny")
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-lmkube-replica"] == "chat-a" and answer.json()["model"] == "acme/tiny-chat"
        listed = httpx.get(f"{gw.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert [m["id"] for m in listed.json()["data"]] == ["acme/tiny-chat"]

        # A second ready pod: new conversations spread over both.
        pod(api, ns, "chat-b", "chat", replicas[1])
        wait_until(lambda: chat(gw, "tiny", content=secrets.token_hex(4)).headers["x-lmkube-replica"] == "chat-b",
                   timeout=30, message="the new pod never got a request")
        # The first pod turns not ready: every request goes to the other at once.
        set_ready(api, ns, "chat-a", False)
        wait_until(lambda: all(chat(gw, "tiny", content=str(i)).headers["x-lmkube-replica"] == "chat-b"
                               for i in range(6)), timeout=30, message="a not-ready pod still gets requests")
        # A LocalModel added, with an alias; one deleted.
        local_model(api, ns, "other", "acme/other-chat", ["second"])
        pod(api, ns, "other-a", "other", replicas[0])
        wait_until(lambda: chat(gw, "second").status_code == 200, timeout=30)
        # A pod that goes away mid-stream (scale-down, rollout) finishes what it streams; new requests avoid it.
        body = {"model": "second", "messages": USER, "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as held:
            lines = held.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            kubernetes.client.CoreV1Api(api).delete_namespaced_pod("other-a", ns)
            wait_until(lambda: chat(gw, "second").status_code == 503, timeout=30,
                       message="a deleted pod still gets new requests")
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
        assert '"finish_reason":"length"' in rest[-2] or '"finish_reason":"length"' in rest[-3]
        kubernetes.client.CustomObjectsApi(api).delete_namespaced_custom_object(
            crd.GROUP, crd.VERSION, ns, crd.PLURAL, "chat")
        wait_until(lambda: chat(gw, "tiny").status_code == 404, timeout=30)
        # Keys follow their Secrets: a new key works, a deleted one no longer does.
        pod(api, ns, "other-b", "other", replicas[1])
        second_key = f"gw-{secrets.token_hex(12)}"
        gateway_key(api, ns, "second", second_key, models="second")
        wait_until(lambda: chat(gw, "second", key=second_key).status_code == 200, timeout=30)
        kubernetes.client.CoreV1Api(api).delete_namespaced_secret("team", ns)
        wait_until(lambda: chat(gw, "second").status_code == 401, timeout=30)
    finally:
        gw.stop()


# An exec credential plugin, as EKS's `aws eks get-token` or GKE's `gke-gcloud-auth-plugin`: prints an
# ExecCredential whose token expires within the client's 5-minute skew, so every request runs it again.
EXEC_PLUGIN = """
import datetime, json, os
with open(os.environ["PLUGIN_LOG"], "a") as log:
    log.write(os.environ["KUBERNETES_EXEC_INFO"] + "\\n")
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": os.environ["PLUGIN_TOKEN"],
                             "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}))
"""


def test_a_kubeconfig_with_an_exec_plugin(kube: KubeCluster, api: Any, kube_namespace: str,
                                          replicas: list[ServerProcess], tmp_path: Path) -> None:
    ns = kube_namespace
    config = yaml.safe_load(gateway_account(kube, ns, tmp_path / "token-kubeconfig").read_text())
    (user,) = config["users"]
    (tmp_path / "plugin.py").write_text(EXEC_PLUGIN)
    user["user"] = {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": ["plugin.py"],
        "interactiveMode": "Never",  # relative to the kubeconfig's folder, as kubectl runs it
        "env": [{"name": "PLUGIN_TOKEN", "value": user["user"]["token"]},
                {"name": "PLUGIN_LOG", "value": str(tmp_path / "plugin.log")}]}}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    local_model(api, ns, "chat", "acme/tiny-chat", ["tiny"])
    pod(api, ns, "chat-a", "chat", replicas[0])
    gateway_key(api, ns, "team", KEY, namespaces=ns)
    (tmp_path / "upstream").write_text(UPSTREAM)
    gw = start_gateway(tmp_path, "--namespace", ns, "--keys-namespace", ns, "--upstream-token-file",
                       str(tmp_path / "upstream"), env={"KUBECONFIG": str(tmp_path / "kubeconfig")})
    try:
        answer = chat(gw, "tiny")
        assert answer.status_code == 200, answer.text
        # Still following changes with the plugin's credential: a second LocalModel appears.
        local_model(api, ns, "other", "acme/other-chat", ["second"])
        pod(api, ns, "other-a", "other", replicas[1])
        wait_until(lambda: chat(gw, "second").status_code == 200, timeout=30)
    finally:
        gw.stop()
    runs = (tmp_path / "plugin.log").read_text().splitlines()
    assert len(runs) > 1, runs  # run again for the expiring credential, not once for good
    assert json.loads(runs[0])["kind"] == "ExecCredential"
    assert "Unauthorized" not in gw.log_path.read_text() and "Forbidden" not in gw.log_path.read_text()
