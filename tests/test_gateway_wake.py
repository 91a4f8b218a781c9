"""Scale from zero through `lmkube gateway`, on the real control plane: a request for a LocalModel at zero
(`spec.scaling.minReplicas: 0`) raises its `spec.replicas` through the scale subresource, with only the chart's
gateway permissions, and is held until a replica serves the model; concurrent first requests share one
scale-up; streaming clients get `: waiting for replica` comments meanwhile; past the bound, 503 (529 for
Anthropic) with Retry-After, or the family's error event once a stream has begun.

The test plays the operator and the kubelet (no node here): when spec.replicas turns 1 it creates the pod,
pointing at a real `lmkube serve` process (127.0.0.1 and its port, as tests/test_gateway_kube.py does), marks it
Ready, then reports the model loaded in the LocalModel's status. The whole loop with the real operator and a
real pod: tests/test_scaling_real_node.py.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
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
MODEL_KEY = "acme/tiny-chat"
CHART_GATEWAY = ROOT / "charts" / "lmkube" / "templates" / "gateway.yaml"


@pytest.fixture(scope="module")
def upstream(start_server: Any, models_dir: Path) -> ServerProcess:
    return start_server(models_dir, "--no-auto-evict", "--api-token", UPSTREAM, token=UPSTREAM)


@pytest.fixture
def api(kube: KubeCluster) -> Iterator[Any]:
    kube.apply_crds(ROOT / "charts" / "lmkube" / "crds" / "localmodels.lmkube.dev.yaml")
    with kube.api_client() as client:
        yield client


def chart_rules(helm_rendered: str) -> list[dict[str, Any]]:
    roles = [d for d in yaml.safe_load_all(helm_rendered) if d and d["kind"] == "ClusterRole"
             and d["metadata"]["name"].endswith("gateway")]
    return roles[0]["rules"]


def gateway(kube: KubeCluster, api: Any, ns: str, tmp_path: Path, *args: str) -> GatewayProcess:
    """The gateway as a ServiceAccount holding exactly the chart's gateway rules (as a Role in `ns`), plus the
    key Secrets' list/watch."""
    rendered = kube.helm("template", "wake", str(ROOT / "charts" / "lmkube"), "--namespace", ns,
                         "--set", "gateway.enabled=true").stdout
    rules = [*chart_rules(rendered), {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}]
    assert {"apiGroups": ["lmkube.dev"], "resources": ["localmodels/scale"], "verbs": ["get", "patch"]} in rules
    kubeconfig = gateway_account(kube, ns, tmp_path / "kubeconfig", rules=rules)
    gateway_key(api, ns, "team", KEY, namespaces=ns)
    (tmp_path / "upstream").write_text(UPSTREAM)
    return start_gateway(tmp_path, "--namespace", ns, "--keys-namespace", ns, "--upstream-token-file",
                         str(tmp_path / "upstream"), *args, env={"KUBECONFIG": str(kubeconfig)})


def model_at_zero(api: Any, ns: str, name: str) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(crd.GROUP, crd.VERSION, ns, crd.PLURAL, {
        "apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name},
        "spec": {"model": MODEL_KEY, "gpu": {"count": 0}, "replicas": 0,
                 "scaling": {"minReplicas": 0, "maxReplicas": 1}}})
    custom.patch_namespaced_custom_object_status(crd.GROUP, crd.VERSION, ns, crd.PLURAL, name, {"status": {
        "modelKey": MODEL_KEY, "phase": "ScaledToZero", "readyReplicas": 0, "replicas": 0}})


def spec_replicas(api: Any, ns: str, name: str) -> int:
    body = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(crd.GROUP, crd.VERSION, ns,
                                                                                crd.PLURAL, name)
    return int(body["spec"].get("replicas", 0))


def start_replica(api: Any, ns: str, name: str, server: ServerProcess) -> None:
    """What the StatefulSet, the kubelet and the operator do once spec.replicas is 1, in two steps: the pod is
    Ready (its server listens), then the operator has loaded the model."""
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_pod(ns, {"metadata": {"name": f"{name}-0", "labels": labels(name)},
                                    "spec": {"containers": [{"name": "lmkube", "image": "lmkube/lmkube:test",
                                                             "ports": [{"name": "http",
                                                                        "containerPort": server.port}]}]}})
    core.patch_namespaced_pod_status(f"{name}-0", ns, {"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}]}})


def report_loaded(api: Any, ns: str, name: str) -> None:
    kubernetes.client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        crd.GROUP, crd.VERSION, ns, crd.PLURAL, name,
        {"status": {"phase": "Ready", "readyReplicas": 1, "replicas": 1}})


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def chat_body(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "stream": stream}


def test_a_request_for_a_model_at_zero_brings_a_replica_and_is_served(
        kube: KubeCluster, api: Any, kube_namespace: str, upstream: ServerProcess, tmp_path: Path) -> None:
    ns = kube_namespace
    model_at_zero(api, ns, "sleepy")
    gw = gateway(kube, api, ns, tmp_path)
    try:
        listed = httpx.get(f"{gw.base_url}/v1/models", headers=headers(), timeout=30).json()
        assert [m["id"] for m in listed["data"]] == [MODEL_KEY]  # listed while at zero
        answers: list[httpx.Response] = []
        stream_lines: list[str] = []

        def one() -> None:
            answers.append(httpx.post(f"{gw.base_url}/v1/chat/completions", headers=headers(), timeout=120,
                                      json=chat_body("sleepy")))

        def streamed() -> None:
            with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", headers=headers(), timeout=120,
                              json=chat_body("sleepy", stream=True)) as response:
                assert response.status_code == 200
                stream_lines.extend(response.iter_lines())

        threads = [threading.Thread(target=one) for _ in range(4)] + [threading.Thread(target=streamed)]
        for thread in threads:
            thread.start()
        wait_until(lambda: spec_replicas(api, ns, "sleepy") == 1, timeout=30, message="the gateway asked for nothing")
        # A pod that is Ready but has not loaded the model yet gets none of the held requests.
        start_replica(api, ns, "sleepy", upstream)
        time.sleep(3)  # discovery sees the pod: a request that comes now is held too
        late = threading.Thread(target=one)
        late.start()
        threads.append(late)
        time.sleep(3)  # more than one comment interval
        assert not answers and all(t.is_alive() for t in threads)
        report_loaded(api, ns, "sleepy")
        for thread in threads:
            thread.join(60)
        assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        assert all(a.json()["model"] == MODEL_KEY for a in answers)
        assert stream_lines[0] == ": waiting for replica"
        data = [line for line in stream_lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and '"chat.completion.chunk"' in data[0], stream_lines
        metrics = httpx.get(f"{gw.base_url}/metrics", timeout=30).text
        assert f'lmkube_gateway_scale_from_zero_total{{model="{ns}/sleepy"}} 1' in metrics  # one ask for all six
        assert f'lmkube_gateway_requests_waiting_for_replica{{model="{ns}/sleepy"}} 0' in metrics
    finally:
        gw.stop()


def test_past_the_bound_each_family_gets_its_retryable_error(
        kube: KubeCluster, api: Any, kube_namespace: str, tmp_path: Path) -> None:
    ns = kube_namespace
    model_at_zero(api, ns, "never")
    gw = gateway(kube, api, ns, tmp_path, "--scale-from-zero-seconds", "1.5")
    try:
        began = time.monotonic()
        answer = httpx.post(f"{gw.base_url}/v1/chat/completions", headers=headers(), timeout=60,
                            json=chat_body("never"))
        assert time.monotonic() - began >= 1.5
        assert answer.status_code == 503 and answer.headers["retry-after"] == "10", answer.text
        error = answer.json()["error"]
        assert error["code"] == "model_not_running" and error["type"] == "server_error"
        assert "scaled to zero" in error["message"]
        assert spec_replicas(api, ns, "never") == 1  # asked for, even though no replica came in time
        anthropic = httpx.post(f"{gw.base_url}/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                               json={"model": "never", "max_tokens": 3,
                                     "messages": [{"role": "user", "content": "Hi"}]})
        assert anthropic.status_code == 529 and anthropic.headers["retry-after"] == "10"
        assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "overloaded_error"
        native = httpx.post(f"{gw.base_url}/api/v1/chat", headers=headers(), timeout=60,
                            json={"model": "never", "input": "Hi"})
        assert native.status_code == 503 and native.json()["error"]["type"] == "internal_error", native.text
        with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", headers=headers(), timeout=60,
                          json=chat_body("never", stream=True)) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
        assert lines[0] == ": waiting for replica"
        assert lines[-2].startswith('data: {"error"') and "scaled to zero" in lines[-2] and lines[-1] == "data: [DONE]"
    finally:
        gw.stop()
