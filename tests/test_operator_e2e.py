"""The operator end to end on the real node: `lmkube operator` (a subprocess on the host, with only the RBAC
rules of operator/rbac.py) against the real node's control plane; the model-server pods run the project's
image (tests/conftest.py `node_image`) under the real kube-scheduler, kubelet, containerd and runc, on
statically provisioned hostPath volumes (tests/node_support.py); they download from the local Hugging Face
stand-in at the node's bridge address (HF_ENDPOINT through spec.env, as users point at a mirror).

This module: a LocalModel's life (download with progress, Ready, a chat, a change reloaded in place, owned
objects recreated, delete), two replicas on a shared claim, idle unload and JIT reload. The failure modes
are in test_operator_e2e_failures.py, the operator's own restarts and peering in test_operator_e2e_ha.py.
One namespace and operator for the module (tests/operator_e2e_support.py); the tests run in file order and
each removes its LocalModel(s) at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hf_hub_server import FakeHub
from kube_cluster import KubeCluster
from lmkube.operator import resources
from node_support import POD_TIMEOUT, LogFollower, kube, node_namespace, provide_volume, service_addresses
from operator_e2e_support import (
    BIG_REPO,
    PHASE_ORDER,
    TINY_REPO,
    api,
    create_lm,
    delete_and_wait_gone,
    hub,
    hub_size,
    lm_spec,
    operator,
    pod_models,
    token_of,
    wait_phase,
)
from operator_support import Api, OperatorProcess, condition
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from support import wait_until

__all__ = ["api", "hub", "kube", "node_namespace", "operator"]  # fixtures

# The project image: a source change rebuilds it (minutes) before the first pod; `-m "not image"` skips these.
pytestmark = [pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"), pytest.mark.image,
              pytest.mark.timeout(BUILD_TIMEOUT + 900)]


# -- tests, in order -----------------------------------------------------------------------------------


def test_happy_path_download_progress_ready_and_chat(real_node: RealNode, kube: KubeCluster, api: Api, hub: FakeHub,
                                                     operator: OperatorProcess, tmp_path: Path) -> None:
    hub.bytes_per_second = 700_000  # ~3 s for the 2 MB model: Downloading is observable
    manifest = tmp_path / "happy.yaml"
    body = {"apiVersion": "lmkube.dev/v1alpha1", "kind": "LocalModel",
            "metadata": {"name": "happy", "namespace": api.namespace},
            "spec": lm_spec(hub, BIG_REPO, contextLength=512)}
    manifest.write_text(json.dumps(body))
    provide_volume(real_node, api.namespace, "models-lm-happy-0")
    began = time.monotonic()
    kube.kubectl("apply", "-f", str(manifest))
    seen: list[tuple[str, float | None]] = []

    def ready() -> bool:
        status = api.status("happy")
        if status.get("phase"):
            sample = (status["phase"], (status.get("download") or {}).get("percent"))
            if not seen or seen[-1] != sample:
                seen.append(sample)
        return status.get("phase") == "Ready"

    wait_until(ready, timeout=POD_TIMEOUT, interval=0.05, message=f"happy Ready; seen {seen}\n{operator.log()[-4000:]}")
    elapsed = time.monotonic() - began
    hub.bytes_per_second = None
    print(f"\n[operator-e2e] kubectl apply -> Ready (2 MB download throttled to 700 kB/s): {elapsed:.2f}s; "
          f"phases {seen}")

    # Phases in order, and download progress that only grows.
    phases = [p for p, _ in seen]
    order = [PHASE_ORDER.index(p) for p in dict.fromkeys(phases)]
    assert order == sorted(order), seen
    assert "Downloading" in phases and phases[-1] == "Ready", seen
    percents = [pct for p, pct in seen if p == "Downloading" and pct is not None]
    assert percents == sorted(percents) and any(0 < pct < 100 for pct in percents), seen

    status = api.status("happy")
    assert status["endpoint"] == f"http://lm-happy.{api.namespace}.svc:1234"
    assert status["readyReplicas"] == 1 and status["modelKey"] == "hub-org/big-gguf"
    assert status["contextLength"] == 512 and status["variant"] == "q4_k_m"
    assert status["download"]["percent"] == 100 and status["download"]["totalBytes"] > 1_000_000
    assert status["observedGeneration"] == api.lm("happy")["metadata"]["generation"]
    for kind in ("PodsReady", "Downloaded", "Loaded", "Ready"):
        assert condition(status, kind)["status"] == "True", status["conditions"]
    reasons = {e["reason"] for e in api.events("happy")}
    assert {"Downloading", "Loading", "Ready"} <= reasons, reasons

    # The owned objects.
    statefulset = api.read("StatefulSet", "lm-happy")
    assert statefulset["metadata"]["ownerReferences"][0]["name"] == "happy"
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in container["env"]}
    assert env["LMKUBE_API_TOKENS"]["valueFrom"]["secretKeyRef"] == {"name": "lm-happy-token", "key": "token"}
    assert env["HF_ENDPOINT"]["value"] == hub.url
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]] == ["models"]
    assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {}))  # gpu.count 0
    assert api.read("PersistentVolumeClaim", "models-lm-happy-0")["spec"]["resources"]["requests"]["storage"] == "1Gi"
    token = token_of(api, "happy")
    assert token.startswith("sk-lm-")

    # A chat completion with the token, through a pod IP the Service's EndpointSlice lists.
    (ip,) = service_addresses(real_node, api.namespace, "lm-happy")
    url = f"http://{ip}:1234/v1/chat/completions"
    chat = {"model": "hub-org/big-gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(url, json=chat, timeout=30).status_code == 401
    answer = httpx.post(url, json=chat, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"


def test_context_length_change_reloads_in_place(api: Api, operator: OperatorProcess) -> None:
    (pod,) = api.pods("happy")
    token = token_of(api, "happy")
    api.patch_lm("happy", {"contextLength": 1024})
    status = wait_phase(api, operator, "happy", "Ready", contextLength=1024)
    assert status["observedGeneration"] == api.lm("happy")["metadata"]["generation"]
    (same,) = api.pods("happy")
    assert same["metadata"]["uid"] == pod["metadata"]["uid"]  # reloaded through the API, not rolled
    instances = pod_models(same["status"]["podIP"], token)["hub-org/big-gguf"]["loaded_instances"]
    assert [i["config"]["context_length"] for i in instances] == [1024]


def test_deleted_owned_objects_come_back(real_node: RealNode, api: Api, operator: OperatorProcess) -> None:
    (old_pod,) = api.pods("happy")
    old_secret = api.read("Secret", "lm-happy-token")
    api.core.delete_namespaced_service("lm-happy", api.namespace)
    old_claim = api.read("PersistentVolumeClaim", "models-lm-happy-0")["metadata"]["uid"]
    old_servers = {r.get("serverId") for r in api.status("happy").get("pods") or []}
    api.apps.delete_namespaced_stateful_set("lm-happy", api.namespace)
    # Its claim goes with it (whenDeleted: Delete), leaving the test's static volume Released; offered again
    # (the same host directory, model files included), it binds the claim the recreated StatefulSet makes.
    wait_until(lambda: (api.read("PersistentVolumeClaim", "models-lm-happy-0") or {"metadata": {"uid": ""}})[
        "metadata"]["uid"] != old_claim, timeout=POD_TIMEOUT, message="the old cache claim deleted")
    real_node.cluster.kubectl("delete", "pv", f"{api.namespace}-models-lm-happy-0", "--wait=true")
    provide_volume(real_node, api.namespace, "models-lm-happy-0")
    wait_until(lambda: api.read("Service", "lm-happy") and api.read("StatefulSet", "lm-happy"), timeout=POD_TIMEOUT,
               message="Service and StatefulSet recreated")

    def new_pod_serving() -> dict[str, Any] | None:
        # The new pod has the old one's name (lm-happy-0): tell them apart by their server (container) ids.
        status = api.status("happy")
        servers = {r.get("serverId") for r in status.get("pods") or []}
        fresh = servers and not servers & old_servers and old_pod["metadata"]["uid"] not in {
            p["metadata"]["uid"] for p in api.pods("happy")}
        return status if fresh and status.get("phase") == "Ready" else None

    # The new pod finds the model on the cache volume and is loaded again (same context length).
    status = wait_until(new_pod_serving, timeout=POD_TIMEOUT, message=f"a new pod Ready: {api.status('happy')}")
    assert status["readyReplicas"] == 1 and status["contextLength"] == 1024
    # The token Secret was never replaced (the volume and the clients keep the same token).
    assert api.read("Secret", "lm-happy-token")["metadata"]["uid"] == old_secret["metadata"]["uid"]


def test_delete_unloads_and_garbage_collects(real_node: RealNode, api: Api, operator: OperatorProcess,
                                             tmp_path: Path) -> None:
    (pod,) = api.pods("happy")
    name = pod["metadata"]["name"]
    assert pod_models(pod["status"]["podIP"], token_of(api, "happy"))["hub-org/big-gguf"]["loaded_instances"]
    follower = LogFollower(real_node, api.namespace, name, tmp_path / "server.log")  # the pod is deleted too
    try:
        delete_and_wait_gone(api, "happy")
    finally:
        log = follower.stop()
    assert api.read("PersistentVolumeClaim", "models-lm-happy-0") is None or \
        api.read("PersistentVolumeClaim", "models-lm-happy-0")["metadata"].get("deletionTimestamp")
    assert "POST /api/v1/models/unload" in log, log[-3000:]


def test_two_replicas_on_a_shared_claim_both_load(real_node: RealNode, api: Api, hub: FakeHub,
                                                  operator: OperatorProcess) -> None:
    provide_volume(real_node, api.namespace, "shared-models", access_mode="ReadWriteMany")
    api.core.create_namespaced_persistent_volume_claim(api.namespace, {
        "metadata": {"name": "shared-models"},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "resources": {"requests": {"storage": "1Gi"}}}})
    api.create_lm("pair", lm_spec(hub, TINY_REPO, replicas=2, storage={"existingClaim": "shared-models"}))
    status = wait_phase(api, operator, "pair", "Ready", timeout=POD_TIMEOUT, readyReplicas=2)
    pods = api.pods("pair")
    assert len(pods) == 2
    token = token_of(api, "pair")
    for pod in pods:
        assert pod_models(pod["status"]["podIP"], token)["hub-org/tiny-gguf"]["loaded_instances"]
    assert "volumeClaimTemplates" not in api.read("StatefulSet", "lm-pair")["spec"]  # the shared claim only
    assert len(status["pods"]) == 2
    delete_and_wait_gone(api, "pair")
    # A shared claim is the user's: never deleted with the LocalModel.
    claim = api.read("PersistentVolumeClaim", "shared-models")
    assert claim is not None and not claim["metadata"].get("deletionTimestamp")


def test_two_replicas_with_default_storage_each_get_a_volume_and_serve(real_node: RealNode, api: Api, hub: FakeHub,
                                                                       operator: OperatorProcess) -> None:
    volumes = create_lm(real_node, api, "duo", lm_spec(hub, TINY_REPO, replicas=2))
    status = wait_phase(api, operator, "duo", "Ready", timeout=POD_TIMEOUT, readyReplicas=2)
    pods = sorted(api.pods("duo"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in pods] == ["lm-duo-0", "lm-duo-1"]
    claims = [next(v["persistentVolumeClaim"]["claimName"] for v in p["spec"]["volumes"] if v["name"] == "models")
              for p in pods]
    assert claims == [resources.replica_claim("duo", 0), resources.replica_claim("duo", 1)]
    # Each replica downloaded into its own volume ...
    for volume in volumes:
        assert list(volume.rglob("*.gguf")), sorted(volume.rglob("*"))
    # ... and each serves a chat on its own.
    token = token_of(api, "duo")
    chat = {"model": "hub-org/tiny-gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for pod in pods:
        answer = httpx.post(f"http://{pod['status']['podIP']}:1234/v1/chat/completions", json=chat,
                            headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    assert len(status["pods"]) == 2
    # Each pod is Ready only once the operator has loaded the model into it (its readiness gate).
    for pod in pods:
        gate = next(c for c in pod["status"]["conditions"] if c["type"] == resources.MODEL_LOADED_CONDITION)
        assert (gate["status"], gate["reason"]) == ("True", "Loaded"), pod["status"]["conditions"]

    def is_ready(pod: dict[str, Any]) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])

    def seen(pod: dict[str, Any]) -> str:
        conditions = {c["type"]: c["status"][0] for c in pod["status"].get("conditions") or []}
        return (f"{pod['metadata']['name']}/{pod['metadata']['uid'][:4]}"
                f"{'/deleting' if pod['metadata'].get('deletionTimestamp') else ''}:R{conditions.get('Ready', '-')}"
                f"C{conditions.get('ContainersReady', '-')}G{conditions.get(resources.MODEL_LOADED_CONDITION, '-')}")

    # The kubelet makes a pod Ready once its gate is True.
    wait_until(lambda: sum(is_ready(p) for p in api.pods("duo")) == 2, timeout=60,
               message=f"pods not Ready: {[seen(p) for p in api.pods('duo')]}")
    # A pod-spec change rolls the StatefulSet one pod at a time; it waits for each new pod to be Ready, i.e.
    # loaded: at every moment some pod is Ready, and every Ready pod has the model loaded.
    old = {p["metadata"]["uid"] for p in pods}
    api.patch_lm("duo", {"env": [*lm_spec(hub, TINY_REPO)["env"], {"name": "LMKUBE_ROLLED", "value": "1"}]})
    ready_counts: list[int] = []
    samples: list[list[str]] = []

    def rolled() -> bool:
        listed = api.pods("duo")
        samples.append([seen(p) for p in listed])
        current = [p for p in listed if not p["metadata"].get("deletionTimestamp")]
        ready = [p for p in current if is_ready(p)]
        for pod in ready:
            try:
                answer = httpx.get(f"http://{pod['status']['podIP']}:1234/api/v1/models",
                                   headers={"Authorization": f"Bearer {token}"}, timeout=10)
            except httpx.HTTPError:
                continue  # deleted since it was listed: its server is stopping
            models = {m["key"]: m for m in answer.json()["models"]} if answer.status_code == 200 else {}
            loaded = models.get("hub-org/tiny-gguf", {}).get("loaded_instances")
            if not loaded:  # only a pod that has gone meanwhile (being deleted, or replaced) may say so
                now = api.read("Pod", pod["metadata"]["name"])
                assert now is None or now["metadata"].get("deletionTimestamp") or \
                    now["metadata"]["uid"] != pod["metadata"]["uid"], \
                    f"pod {pod['metadata']['name']} is Ready without the model loaded: {answer.text}"
        ready_counts.append(len(ready))
        uids = {p["metadata"]["uid"] for p in ready}
        return len(uids) == 2 and not uids & old and api.status("duo").get("readyReplicas") == 2

    wait_until(rolled, timeout=2 * POD_TIMEOUT, interval=0.3, message=f"not rolled: {api.status('duo')}")
    print(f"\n[operator-e2e] rollout of 2 replicas with their own volumes: {len(ready_counts)} samples, "
          f"fewest Ready pods {min(ready_counts)}")
    assert min(ready_counts) >= 1, "\n".join(" ".join(sample) for sample in samples)
    delete_and_wait_gone(api, "duo")


def test_ttl_idle_unload_shows_idle_then_jit_reload(real_node: RealNode, api: Api, hub: FakeHub,
                                                    operator: OperatorProcess) -> None:
    began = time.monotonic()
    create_lm(real_node, api, "idle", lm_spec(hub, TINY_REPO, ttl="2s"))
    wait_phase(api, operator, "idle", "Ready", timeout=POD_TIMEOUT)
    print(f"\n[operator-e2e] create -> Ready, unthrottled {hub_size(hub, TINY_REPO)} byte model: "
          f"{time.monotonic() - began:.2f}s")
    status = wait_phase(api, operator, "idle", "Idle", timeout=POD_TIMEOUT)
    assert condition(status, "Loaded")["reason"] == "IdleUnloaded"
    assert condition(status, "Ready")["status"] == "True"  # the server still answers: it loads on demand
    (ip,) = service_addresses(real_node, api.namespace, "lm-idle")
    token = token_of(api, "idle")
    assert pod_models(ip, token)["hub-org/tiny-gguf"]["loaded_instances"] == []  # the operator did not reload it
    chat = {"model": "hub-org/tiny-gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answer = httpx.post(f"http://{ip}:1234/v1/chat/completions", json=chat,
                        headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert answer.status_code == 200, answer.text

    def in_use_and_ready() -> bool:
        # Keep it busy: with a 2 s ttl the server would unload it again between the operator's checks.
        httpx.post(f"http://{ip}:1234/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {token}"},
                   timeout=60)
        return api.status("idle").get("phase") == "Ready"

    wait_until(in_use_and_ready, timeout=POD_TIMEOUT, interval=0.2,
               message=f"Ready after a JIT load: {api.status('idle')}")
    delete_and_wait_gone(api, "idle")
