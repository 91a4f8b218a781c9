"""The local end-to-end run (also `e2e/local.sh`), on the real node: the Helm chart installed with the
project's image (`imagePullPolicy: Never`, imported into the node's containerd), its operator pods run by the
kubelet and reaching the apiserver through the `kubernetes` Service with the chart's ServiceAccount, then
`kubectl apply -f e2e/localmodel.yaml` -> a model pod of the same image downloads from the local Hugging Face
stand-in (Downloading with a percent) -> Ready -> the official `openai` SDK chats through the Service's
ClusterIP with the token from the model's Secret, and an in-cluster client pod does the same at
`status.endpoint` -> `kubectl delete -f` -> the server unloads and the owned objects are garbage-collected ->
`helm uninstall`.

The example is served as written: the fake hub hosts a (synthetic, small) GGUF under the example's own repo
and file name, and the test only adds HF_ENDPOINT to spec.env and sets the namespace. Its cache claim gets a
statically provisioned volume (tests/node_support.py), as on a cluster without a storage provisioner.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from hf_hub_server import FakeHub
from kube_cluster import ROOT, KubeCluster
from lmkube.operator import resources
from node_support import (
    CHAT_CLIENT,
    POD_TIMEOUT,
    LogFollower,
    client_pod,
    delete_volumes,
    pod_log,
    provide_volume,
    run_client,
)
from operator_support import Api
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from real_node_config import NODE_IP
from support import wait_until

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

# The project image: a source change rebuilds it (minutes) before the first pod; `-m "not image"` skips these.
pytestmark = [pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"), pytest.mark.image,
              pytest.mark.timeout(BUILD_TIMEOUT + 900)]

CHART = ROOT / "charts" / "lmkube"
EXAMPLE = ROOT / "e2e" / "localmodel.yaml"
HELM_WAIT = 240  # under KubeCluster.helm's own 300 s limit
OPERATOR_REPLICAS = 2  # exercises the chart's peering object: one active operator, one on standby
MODEL = LlamaShape(n_vocab=4096, n_embd=128)  # ~2 MB: a throttled download lasts long enough to watch


def _example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def _get(kube: KubeCluster, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    result = kube.kubectl("get", kind, name, *(["-n", namespace] if namespace else []), "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    return json.loads(result.stdout)


def _pods(kube: KubeCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    items = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions") or [])


@pytest.fixture(scope="module")
def hub(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    spec = _example()["spec"]
    # The file name the real repo has for the example's variant.
    filename = f"{spec['model'].split('/')[1].removesuffix('-GGUF').lower()}-{spec['variant']}.gguf"
    model = write_llama_model(tmp_path_factory.mktemp("e2e-hub") / filename, MODEL, seed=31, name="Qwen-e2e")
    hub = FakeHub(host=NODE_IP).start()  # where pods reach the host
    hub.add_repo(spec["model"], {filename: model})
    yield hub
    hub.stop()


def test_helm_install_apply_chat_delete_uninstall(node_image: str, real_node: RealNode, hub: FakeHub,
                                                  tmp_path: Path) -> None:
    kube = real_node.cluster
    suffix = secrets.token_hex(3)
    system_ns, models_ns, release = f"lmkube-system-{suffix}", f"lmkube-demo-{suffix}", f"e2e-{suffix}"
    kube.create_namespace(system_ns)
    kube.create_namespace(models_ns)
    try:
        _run(real_node, node_image, hub, tmp_path, system_ns, models_ns, release)
    finally:
        kube.helm("uninstall", release, "-n", system_ns, "--wait", check=False)
        for namespace in (system_ns, models_ns):
            kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        delete_volumes(real_node, models_ns)


def _run(node: RealNode, image: str, hub: FakeHub, tmp_path: Path, system_ns: str, models_ns: str,
         release: str) -> None:
    kube = node.cluster
    fullname = f"{release}-lmkube"
    repository, tag = image.rsplit(":", 1)
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "serverImage": {"pullPolicy": "Never"},
        "operator": {
            "replicas": OPERATOR_REPLICAS, "watchNamespaces": [models_ns],
            # Quicker than the defaults, so the run takes seconds.
            "extraEnv": [{"name": "LMKUBE_OPERATOR_POLL_SECONDS", "value": "0.5"},
                         {"name": "LMKUBE_OPERATOR_RESYNC_SECONDS", "value": "3"},
                         {"name": "LMKUBE_OPERATOR_RETRY_SECONDS", "value": "1"}],
        },
        "podDisruptionBudget": {"enabled": True},
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))

    # -- helm install: the operator runs from the chart's Deployment, with the chart's ServiceAccount.
    began = time.monotonic()
    installed = kube.helm("install", release, str(CHART), "-n", system_ns, "-f", str(tmp_path / "values.yaml"),
                          "--wait", "--timeout", f"{HELM_WAIT}s", check=False)
    install_seconds = time.monotonic() - began
    if installed.returncode != 0:
        pods = kube.kubectl("get", "pods", "-n", system_ns, "-o", "yaml").stdout
        logs = "\n".join(f"--- {p['metadata']['name']}:\n{pod_log(node, system_ns, p['metadata']['name'])[-3000:]}"
                         for p in _pods(kube, system_ns, "app.kubernetes.io/component=operator"))
        raise AssertionError(f"helm install failed: {installed.stderr}\n{pods[-6000:]}\n{logs}")
    operators = _pods(kube, system_ns, "app.kubernetes.io/component=operator")
    assert len(operators) == OPERATOR_REPLICAS and all(_ready(p) for p in operators), operators
    for pod in operators:
        assert pod["spec"]["serviceAccountName"] == fullname
        assert pod["spec"]["nodeName"] == node.name
        (container,) = pod["status"]["containerStatuses"]
        assert container["image"].endswith(image.rsplit("/", 1)[-1]) and container["imageID"], container
    print(f"\n[e2e-local] helm install --wait -> {OPERATOR_REPLICAS} operator pods Ready: {install_seconds:.2f}s")

    # -- kubectl apply -f e2e/localmodel.yaml (namespace and HF_ENDPOINT adjusted, see the module docstring)
    body = _example()
    body["metadata"]["namespace"] = models_ns
    body["spec"]["env"] = [*body["spec"].get("env", []), {"name": "HF_ENDPOINT", "value": hub.url}]
    manifest = tmp_path / "localmodel.yaml"
    manifest.write_text(yaml.safe_dump(body))
    name = body["metadata"]["name"]
    names = resources.names(name)
    provide_volume(node, models_ns, resources.replica_claim(name, 0), size=body["spec"]["storage"]["size"])
    api = Api(kube, models_ns)
    seen: list[tuple[str, float | None]] = []

    def ready() -> dict[str, Any] | None:
        status = api.status(name)
        if status.get("phase"):
            sample = (status["phase"], (status.get("download") or {}).get("percent"))
            if not seen or seen[-1] != sample:
                seen.append(sample)
        return status if status.get("phase") == "Ready" else None

    hub.bytes_per_second = 500_000  # ~4 s for the 2 MB model: Downloading is observable
    began = time.monotonic()
    kube.kubectl("apply", "-f", str(manifest))
    try:
        status = wait_until(ready, timeout=POD_TIMEOUT, interval=0.1)
    except TimeoutError:
        logs = "\n".join(pod_log(node, system_ns, p["metadata"]["name"])[-3000:] for p in operators)
        raise AssertionError(f"{name} not Ready; seen {seen}: {api.status(name)}\n{logs}") from None
    finally:
        hub.bytes_per_second = None
        api.close()
    ready_seconds = time.monotonic() - began
    print(f"[e2e-local] kubectl apply -> LocalModel Ready (pod start, 2 MB download throttled to 500 kB/s, load): "
          f"{ready_seconds:.2f}s; phases {seen}")
    percents = [pct for phase, pct in seen if phase == "Downloading" and pct is not None]
    assert any(0 < pct < 100 for pct in percents) and percents == sorted(percents), seen
    assert status["endpoint"] == f"http://lm-{name}.{models_ns}.svc:1234"
    assert status["modelKey"] == body["spec"]["model"].lower() and status["readyReplicas"] == 1

    # Peering: normally one operator handles the LocalModel and the other stands by. When both replicas
    # start within the same instant, kopf's peering can leave both active for a few seconds (reconciling is
    # idempotent, so the result is the same): require only that one of them handled it.
    # tests/test_operator_e2e.py checks standby and failover with replicas started one after the other.
    operator_logs = {p["metadata"]["name"]: pod_log(node, system_ns, p["metadata"]["name"]) for p in operators}
    assert any("kopf.objects:" in log for log in operator_logs.values()), operator_logs

    # -- a chat with the token from the Secret: from the host through the ClusterIP (kube-proxy), with the
    # official OpenAI SDK, and from a client pod at status.endpoint.
    secret = _get(kube, "secret", names.secret, models_ns)
    token = base64.b64decode(secret["data"]["token"]).decode()
    cluster_ip = _get(kube, "service", names.service, models_ns)["spec"]["clusterIP"]
    port = status["endpoint"].rsplit(":", 1)[1]
    client = openai.OpenAI(base_url=f"http://{cluster_ip}:{port}/v1", api_key=token, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model=status["modelKey"], max_tokens=8,
                                            messages=[{"role": "user", "content": "Say hello."}])
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://{cluster_ip}:{port}/v1", api_key="sk-wrong", max_retries=0).models.list()
    loaded = httpx.get(f"http://{cluster_ip}:{port}/api/v1/models", headers={"Authorization": f"Bearer {token}"},
                       timeout=60).json()
    assert [i["id"] for m in loaded["models"] for i in m["loaded_instances"]], loaded

    in_cluster = run_client(node, client_pod(
        "chat-client", models_ns, image, status["endpoint"], cluster_ip, CHAT_CLIENT,
        env=[{"name": "LMKUBE_TOKEN", "valueFrom": {"secretKeyRef": {"name": names.secret, "key": "token"}}},
             {"name": "LMKUBE_MODEL", "value": status["modelKey"]}]))
    assert in_cluster["anonymous"] == 401, in_cluster
    assert in_cluster["status"] == 200 and in_cluster["body"]["object"] == "chat.completion", in_cluster
    assert in_cluster["body"]["usage"]["completion_tokens"] >= 1, in_cluster
    kube.kubectl("delete", "pod", "chat-client", "-n", models_ns, "--wait=false")

    # -- kubectl delete -f: the operator unloads the model on the pod, then everything owned is collected.
    (model_pod,) = _pods(kube, models_ns, f"app.kubernetes.io/instance={name}")
    follower = LogFollower(node, models_ns, model_pod["metadata"]["name"], tmp_path / "server.log")
    began = time.monotonic()
    try:
        kube.kubectl("delete", "-f", str(manifest), "--wait=false")
        wait_until(lambda: all(_get(kube, kind, obj, models_ns) is None for kind, obj in (
            ("statefulset", names.statefulset), ("service", names.service), ("secret", names.secret),
            ("persistentvolumeclaim", resources.replica_claim(name, 0))))
            and not _pods(kube, models_ns, f"app.kubernetes.io/instance={name}"),
            timeout=POD_TIMEOUT, message=f"{name}'s objects garbage-collected")
    finally:
        server_log = follower.stop()
    print(f"[e2e-local] kubectl delete -> unloaded and collected: {time.monotonic() - began:.2f}s")
    assert "POST /api/v1/models/unload HTTP/1.1\" 200" in server_log, server_log[-3000:]
    assert "unloaded " in server_log

    # The operators ran with the chart's RBAC and never were refused anything, nor restarted (liveness).
    for pod in operators:
        log = pod_log(node, system_ns, pod["metadata"]["name"])
        assert "Forbidden" not in log and " 403" not in log, log[-5000:]
        current = _get(kube, "pod", pod["metadata"]["name"], system_ns)
        assert current["status"]["containerStatuses"][0]["restartCount"] == 0

    # -- helm uninstall: the operator and its RBAC go; the CRDs stay.
    kube.helm("uninstall", release, "-n", system_ns, "--wait", "--timeout", f"{HELM_WAIT}s")
    assert _get(kube, "deployment", fullname, system_ns) is None
    assert _get(kube, "clusterrole", fullname) is None and _get(kube, "role", fullname, models_ns) is None
    wait_until(lambda: not _pods(kube, system_ns, "app.kubernetes.io/component=operator"), timeout=POD_TIMEOUT,
               message="operator pods stopped")
    assert _get(kube, "crd", "localmodels.lmkube.dev") is not None
