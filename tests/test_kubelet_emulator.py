"""The test control plane with emulated nodes: the real kube-controller-manager turns Deployments built by
lmkube.operator.resources into ReplicaSets and Pods, tests/kubelet_emulator.py schedules them and runs real
`lmkube serve` processes for them (no operator involved). Also the TokenRequest-based ServiceAccount kubeconfig.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes.client
import kubernetes.config
import pytest
from kube_cluster import KubeCluster
from kubelet_emulator import KubeletEmulator
from kubernetes.client.exceptions import ApiException
from lmkube.operator import resources
from lmkube.operator.spec import parse_spec
from support import CHAT_MODEL, wait_until

from lmkube.synthetic_gguf import write_llama_model

NAME = "tiny"
TOKEN = "sk-emulated-" + secrets.token_hex(8)
CPU = {"cpu": "8", "memory": "32Gi", "pods": "110"}


class Api:
    """Raw-JSON access to the admin API (the emulator's style: no typed models to round-trip)."""

    def __init__(self, kube: KubeCluster, namespace: str) -> None:
        self.client = kube.api_client()
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(self.client)
        self.namespace = namespace

    def pods(self) -> list[dict[str, Any]]:
        return json.loads(self.core.list_namespaced_pod(self.namespace, _preload_content=False).data)["items"]

    def replica_sets(self) -> list[dict[str, Any]]:
        return json.loads(self.apps.list_namespaced_replica_set(self.namespace, _preload_content=False).data)["items"]

    def pod(self, name: str) -> dict[str, Any]:
        return json.loads(self.core.read_namespaced_pod(name, self.namespace, _preload_content=False).data)

    def ready_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.pods()
                if _condition(p, "Ready") == "True" and not p["metadata"].get("deletionTimestamp")]


def _condition(pod: dict[str, Any], kind: str, field: str = "status") -> str | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition["type"] == kind:
            return condition.get(field)
    return None


def _waiting_reason(pod: dict[str, Any]) -> str | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if "waiting" in status.get("state", {}):
            return status["state"]["waiting"]["reason"]
    return None


@pytest.fixture
def api(kube: KubeCluster, kube_namespace: str) -> Iterator[Api]:
    api = Api(kube, kube_namespace)
    yield api
    api.client.close()


def deploy(api: Api, spec: dict[str, Any], claim: str | None = None, env: list[dict[str, str]] | None = None) -> str:
    """Token Secret, PVC (or `claim`), Service and Deployment for a LocalModel-like spec; the Deployment's name."""
    parsed = parse_spec({"model": CHAT_MODEL, "gpu": {"count": 0}, "env": env or [],
                         **({"storage": {"existingClaim": claim}} if claim else {}), **spec})
    api.core.create_namespaced_secret(api.namespace, resources.token_secret(NAME, api.namespace, TOKEN),
                                      _preload_content=False)
    claim_body = resources.pvc(NAME, api.namespace, parsed) or {
        "metadata": {"name": claim}, "spec": {"accessModes": ["ReadWriteMany"],
                                              "resources": {"requests": {"storage": "1Gi"}}}}
    api.core.create_namespaced_persistent_volume_claim(api.namespace, claim_body, _preload_content=False)
    api.core.create_namespaced_service(api.namespace, resources.service(NAME, api.namespace), _preload_content=False)
    body = resources.deployment(NAME, api.namespace, parsed)
    api.apps.create_namespaced_deployment(api.namespace, body, _preload_content=False)
    return body["metadata"]["name"]


def models_answer(ip: str) -> list[str]:
    response = httpx.get(f"http://{ip}:1234/api/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.status_code == 200, response.text
    return [m["key"] for m in response.json()["models"]]


Kubelet = Callable[..., KubeletEmulator]


def test_deployment_pods_run_real_servers(api: Api, kubelet: Kubelet) -> None:
    emu = kubelet(api.namespace)
    emu.add_node("cpu-node", capacity=CPU)
    # A model in the claim's host directory: the pods' --models-dir /models must be mapped onto it.
    write_llama_model(emu.volume_dir("shared") / "acme" / "tiny-chat" / "tiny-chat-F16.gguf", name="Tiny Chat")
    name = deploy(api, {"replicas": 2}, claim="shared")

    ready = wait_until(lambda: len(api.ready_pods()) == 2 and api.ready_pods(), timeout=60,
                       message="two Ready pods")
    (rs,) = api.replica_sets()
    assert rs["metadata"]["ownerReferences"][0]["name"] == name
    ips = {p["status"]["podIP"] for p in ready}
    assert len(ips) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    for pod in ready:
        assert pod["spec"]["nodeName"] == "cpu-node"
        assert pod["metadata"]["ownerReferences"][0]["name"] == rs["metadata"]["name"]
        assert emu.pod_ip(pod["metadata"]["name"]) == pod["status"]["podIP"]
        (container,) = pod["status"]["containerStatuses"]
        assert pod["status"]["phase"] == "Running" and container["ready"] and container["started"]
        assert container["restartCount"] == 0, emu.server_log(pod["metadata"]["name"])
        assert models_answer(pod["status"]["podIP"]) == [CHAT_MODEL]
        # The token Secret reached the server through secretKeyRef: no token, no answer.
        assert httpx.get(f"http://{pod['status']['podIP']}:1234/api/v1/models").status_code == 401
        # --models-dir and --host were rewritten: the claim's host directory, the pod's own IP.
        serving = f"serving {emu.volume_dir('shared')} on http://{pod['status']['podIP']}:1234"
        assert serving in emu.server_log(pod["metadata"]["name"])
    assert sorted(emu.running_pods()) == sorted(p["metadata"]["name"] for p in ready)
    # What the Service's EndpointSlice would list (the real controller is off: loopback pod IPs are invalid there).
    assert set(emu.service_addresses(name)) == ips
    # The deployment controller saw the pods' Ready conditions.
    status = wait_until(lambda: (d := json.loads(api.apps.read_namespaced_deployment(
        name, api.namespace, _preload_content=False).data)["status"]).get("availableReplicas") == 2 and d,
        timeout=30, message="Deployment available")
    assert status["readyReplicas"] == 2


def test_recreate_rollout_then_garbage_collection(api: Api, kubelet: Kubelet) -> None:
    emu = kubelet(api.namespace)
    emu.add_node("cpu-node", capacity=CPU)
    name = deploy(api, {})
    (first,) = wait_until(api.ready_pods, timeout=60, message="first pod Ready")
    old_ip = first["status"]["podIP"]
    assert models_answer(old_ip) == []

    patch = {"spec": {"template": {"spec": {"containers": [{"name": resources.CONTAINER_NAME, "env": [
        {"name": "ROLLOUT", "value": "2"}]}]}}}}
    api.apps.patch_namespaced_deployment(name, api.namespace, patch, _preload_content=False)
    (second,) = wait_until(lambda: [p for p in api.ready_pods() if p["metadata"]["name"] != first["metadata"]["name"]],
                           timeout=60, message="rolled pod Ready")
    assert {c["name"]: c.get("value") for c in second["spec"]["containers"][0]["env"]}["ROLLOUT"] == "2"
    assert len(api.replica_sets()) == 2
    # Recreate: the old pod was terminated (its server is gone) before the new one was created.
    assert first["metadata"]["name"] not in {p["metadata"]["name"] for p in api.pods()}
    assert emu.running_pods() == [second["metadata"]["name"]]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{old_ip}:1234/health", timeout=2)
    models_answer(second["status"]["podIP"])

    # Deleting the Deployment: the garbage collector deletes its ReplicaSets, which own the pods.
    api.apps.delete_namespaced_deployment(name, api.namespace, _preload_content=False)
    wait_until(lambda: not api.replica_sets() and not api.pods(), timeout=60, message="ReplicaSets and Pods GC'd")
    wait_until(lambda: not emu.running_pods(), timeout=10, message="processes stopped")
    log = emu.server_log(second["metadata"]["name"])
    assert "Shutting down" in log or "Finished server process" in log, log[-2000:]


def test_gpu_pod_waits_for_a_gpu_node(api: Api, kubelet: Kubelet) -> None:
    emu = kubelet(api.namespace)
    emu.add_node("cpu-node", capacity=CPU)
    deploy(api, {"gpu": {"count": 1}})
    pod = wait_until(lambda: [p for p in api.pods() if _condition(p, "PodScheduled") == "False"], timeout=30,
                     message="pod Unschedulable")[0]
    assert _condition(pod, "PodScheduled", "reason") == "Unschedulable"
    assert _condition(pod, "PodScheduled", "message") == (
        "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available: "
        "1 No preemption victims found for incoming pod.")
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")

    emu.add_node("gpu-node", capacity={**CPU, "nvidia.com/gpu": "1"}, labels={"lmkube.dev/gpu": "true"})
    (ready,) = wait_until(api.ready_pods, timeout=60, message="GPU pod Ready")
    assert ready["metadata"]["name"] == pod["metadata"]["name"]
    assert ready["spec"]["nodeName"] == "gpu-node"
    assert _condition(ready, "PodScheduled") == "True"
    models_answer(ready["status"]["podIP"])

    emu.close()  # a clean shutdown stops every process
    assert emu.running_pods() == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{ready['status']['podIP']}:1234/health", timeout=2)


def test_unpullable_image_backs_off(api: Api, kubelet: Kubelet) -> None:
    emu = kubelet(api.namespace)
    emu.add_node("cpu-node", capacity=CPU)
    emu.unpullable_images.add("registry.invalid/nope:1")
    deploy(api, {"image": "registry.invalid/nope:1"})
    reasons = set()

    def backed_off() -> bool:
        pods = api.pods()
        reasons.update(_waiting_reason(p) for p in pods)
        return any(_waiting_reason(p) == "ImagePullBackOff" for p in pods)

    wait_until(backed_off, timeout=30, interval=0.05, message="ImagePullBackOff")
    assert "ErrImagePull" in reasons
    (pod,) = api.pods()
    assert pod["status"]["phase"] == "Pending" and _condition(pod, "Ready") == "False"
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == \
        'Back-off pulling image "registry.invalid/nope:1"'
    assert emu.running_pods() == []


def test_crash_loop_and_config_errors(api: Api, kubelet: Kubelet) -> None:
    emu = kubelet(api.namespace, restart_backoff=(0.5, 2.0))
    emu.add_node("cpu-node", capacity=CPU)
    crash = {"name": "crash", "image": "busybox", "command": ["python", "-c", "import sys; sys.exit(3)"]}
    api.core.create_namespaced_pod(api.namespace, {"metadata": {"name": "crasher"}, "spec": {"containers": [crash]}},
                                   _preload_content=False)
    missing = {"name": "app", "image": "busybox", "command": ["python", "-c", "pass"],
               "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}
    api.core.create_namespaced_pod(api.namespace, {"metadata": {"name": "misconfigured"},
                                                   "spec": {"containers": [missing]}}, _preload_content=False)

    def crash_looping() -> dict[str, Any] | None:
        (status,) = api.pod("crasher")["status"].get("containerStatuses") or [{"restartCount": 0}]
        return status if status["restartCount"] >= 2 and "waiting" in status["state"] else None

    status = wait_until(crash_looping, timeout=30, message="CrashLoopBackOff")
    assert status["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert api.pod("crasher")["status"]["phase"] == "Running"
    waiting = api.pod("misconfigured")["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting == {"reason": "CreateContainerConfigError", "message": 'secret "absent" not found'}


def test_probes_drive_readiness_and_restarts(api: Api, kubelet: Kubelet) -> None:
    emu = kubelet(api.namespace)
    emu.add_node("cpu-node", capacity=CPU)
    www = emu.volume_dir("www")
    (www / "ready").write_text("ok")
    (www / "alive").write_text("ok")
    api.core.create_namespaced_persistent_volume_claim(api.namespace, {"metadata": {"name": "www"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}, _preload_content=False)

    def probe(path: str, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "web"}, "periodSeconds": 10, "failureThreshold": failures}

    container = {
        "name": "web", "image": "python:3.11",
        "command": ["python", "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", "/srv/www"],
        "ports": [{"name": "web", "containerPort": 8080}],
        "volumeMounts": [{"name": "content", "mountPath": "/srv/www"}],
        "readinessProbe": probe("/ready", 1), "livenessProbe": probe("/alive", 2),
    }
    api.core.create_namespaced_pod(api.namespace, {"metadata": {"name": "web"}, "spec": {
        "containers": [container], "terminationGracePeriodSeconds": 2,
        "volumes": [{"name": "content", "persistentVolumeClaim": {"claimName": "www"}}]}}, _preload_content=False)
    wait_until(lambda: _condition(api.pod("web"), "Ready") == "True", timeout=30, message="web Ready")
    pvc = json.loads(api.core.read_namespaced_persistent_volume_claim("www", api.namespace, _preload_content=False)
                     .data)
    assert pvc["status"]["phase"] == "Bound"

    (www / "ready").unlink()
    wait_until(lambda: _condition(api.pod("web"), "Ready") == "False", timeout=10, message="web unready")
    status = api.pod("web")["status"]["containerStatuses"][0]
    assert "running" in status["state"] and status["restartCount"] == 0 and not status["ready"]
    assert _condition(api.pod("web"), "ContainersReady", "message") == "containers with unready status: [web]"
    (www / "ready").write_text("ok")
    wait_until(lambda: _condition(api.pod("web"), "Ready") == "True", timeout=10, message="web Ready again")

    (www / "alive").unlink()  # the liveness probe fails twice: the process is restarted
    restarted = wait_until(lambda: (s := api.pod("web")["status"]["containerStatuses"][0])["restartCount"] >= 1 and s,
                           timeout=20, message="restart after liveness failures")
    assert restarted["lastState"]["terminated"]["exitCode"] in (143, 137)  # SIGTERM, or SIGKILL after the grace
    (www / "alive").write_text("ok")
    wait_until(lambda: _condition(api.pod("web"), "Ready") == "True", timeout=20, message="web Ready after restart")
    assert "emulated start" in emu.server_log("web")


def test_service_account_kubeconfig_has_only_its_rbac(kube: KubeCluster, api: Api, tmp_path: Path) -> None:
    api.core.create_namespaced_service_account(api.namespace, {"metadata": {"name": "robot"}}, _preload_content=False)
    path = kube.service_account_kubeconfig(api.namespace, "robot", tmp_path / "robot.kubeconfig")
    client = kubernetes.config.new_client_from_config(config_file=str(path))
    core = kubernetes.client.CoreV1Api(client)
    with pytest.raises(ApiException) as denied:
        core.list_namespaced_pod(api.namespace, _preload_content=False)
    assert denied.value.status == 403
    assert f"system:serviceaccount:{api.namespace}:robot" in denied.value.body

    api.rbac.create_namespaced_role(api.namespace, {"metadata": {"name": "pod-reader"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}, _preload_content=False)
    api.rbac.create_namespaced_role_binding(api.namespace, {
        "metadata": {"name": "robot-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": api.namespace}]}, _preload_content=False)
    listing = wait_until(lambda: _try_list(core, api.namespace), timeout=10, message="RoleBinding takes effect")
    assert listing["items"] == []
    with pytest.raises(ApiException) as other:  # still nothing outside the Role
        core.list_namespaced_secret(api.namespace, _preload_content=False)
    assert other.value.status == 403
    client.close()


def _try_list(core: kubernetes.client.CoreV1Api, namespace: str) -> dict[str, Any] | None:
    try:
        return json.loads(core.list_namespaced_pod(namespace, _preload_content=False).data)
    except ApiException as error:
        if error.status != 403:
            raise
        return None


def test_scheduler_filters_and_messages(api: Api, kubelet: Kubelet) -> None:
    emu = kubelet(api.namespace)
    emu.unpullable_images.add("registry.invalid/hold:1")  # pods are bound, but no process runs
    emu.add_node("plain-node", capacity=CPU)
    emu.add_node("gpu-node", capacity={**CPU, "nvidia.com/gpu": "1"}, labels={"accel": "nvidia"},
                 taints=[{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}])

    def pod(name: str, *, tolerate: bool) -> None:
        container = {"name": "c", "image": "registry.invalid/hold:1", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
        spec: dict[str, Any] = {"containers": [container], "nodeSelector": {"accel": "nvidia"}}
        if tolerate:
            spec["tolerations"] = [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
        api.core.create_namespaced_pod(api.namespace, {"metadata": {"name": name}, "spec": spec},
                                       _preload_content=False)

    def message(name: str) -> str | None:
        return wait_until(lambda: _condition(api.pod(name), "PodScheduled", "message"), timeout=20)

    pod("first", tolerate=True)
    wait_until(lambda: api.pod("first")["spec"].get("nodeName") == "gpu-node", timeout=20, message="first bound")
    pod("second", tolerate=True)
    assert message("second") == (
        "0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node "
        "affinity/selector. preemption: 0/2 nodes are available: 1 No preemption victims found for incoming pod, "
        "1 Preemption is not helpful for scheduling.")
    pod("intolerant", tolerate=False)
    assert message("intolerant") == (
        "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated "
        "taint {dedicated: gpu}. preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling.")

    def events() -> set[tuple[str, str]]:
        items = json.loads(api.core.list_namespaced_event(api.namespace, _preload_content=False).data)["items"]
        return {(e["involvedObject"]["name"], e["reason"]) for e in items}

    expected = {("first", "Scheduled"), ("second", "FailedScheduling"), ("intolerant", "FailedScheduling")}
    wait_until(lambda: events() >= expected, timeout=10, message=f"events {expected}")  # posted after the status

    # The GPU is freed: the pending pod that tolerates the taint is scheduled, the other one still is not.
    api.core.delete_namespaced_pod("first", api.namespace, _preload_content=False)
    wait_until(lambda: api.pod("second")["spec"].get("nodeName") == "gpu-node", timeout=20, message="second bound")
    assert _condition(api.pod("second"), "PodScheduled") == "True"
    assert not api.pod("intolerant")["spec"].get("nodeName")


def test_watch_survives_dropped_connections(api: Api, kubelet: Kubelet) -> None:
    emu = kubelet(api.namespace)
    emu.add_node("cpu-node", capacity=CPU)
    sleeper = {"name": "c", "image": "python:3.11", "command": ["python", "-c", "import time; time.sleep(600)"]}
    for name in ("p0", "p1"):
        response = wait_until(lambda: emu._watch_response, timeout=10, message="watch open")
        response.shutdown()  # the connection drops mid-watch, as on an apiserver restart
        api.core.create_namespaced_pod(api.namespace, {"metadata": {"name": name},
                                                       "spec": {"containers": [sleeper]}}, _preload_content=False)
        wait_until(lambda n=name: n in emu.running_pods(), timeout=20, message=f"{name} started after a reconnect")
    api.core.delete_collection_namespaced_pod(api.namespace, _preload_content=False)
    wait_until(lambda: not emu.running_pods() and not api.pods(), timeout=30, message="pods stopped and deleted")
    emu.check()  # a dropped watch is routine: logged, not an error


LOGIN_SCRIPT = """
import json, os, kubernetes.client, kubernetes.config
assert "KUBERNETES_SERVICE_HOST" not in os.environ
kubernetes.config.load_kube_config()  # what kopf falls back to outside a real pod: KUBECONFIG
core = kubernetes.client.CoreV1Api()
names = [p.metadata.name for p in core.list_namespaced_pod(os.environ["NS"]).items]
try:
    core.list_namespaced_secret(os.environ["NS"])
    secrets = "allowed"
except kubernetes.client.exceptions.ApiException as error:
    secrets = error.status
print("RESULT", json.dumps({"pods": names, "secrets": secrets}), flush=True)
"""


def test_automounted_service_account_token_logs_in_as_that_account(api: Api, kubelet: Kubelet) -> None:
    api.core.create_namespaced_service_account(api.namespace, {"metadata": {"name": "lister"}}, _preload_content=False)
    api.rbac.create_namespaced_role(api.namespace, {"metadata": {"name": "pod-lister"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}, _preload_content=False)
    api.rbac.create_namespaced_role_binding(api.namespace, {
        "metadata": {"name": "lister"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
        "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": api.namespace}]}, _preload_content=False)
    emu = kubelet(api.namespace)
    emu.add_node("cpu-node", capacity=CPU)
    container = {"name": "login", "image": "python:3.11", "command": ["python", "-c", LOGIN_SCRIPT],
                 "env": [{"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]}
    spec = {"serviceAccountName": "lister", "restartPolicy": "Never", "containers": [container]}
    api.core.create_namespaced_pod(api.namespace, {"metadata": {"name": "login"}, "spec": spec},
                                   _preload_content=False)
    # No token mounted (automountServiceAccountToken: false): no KUBECONFIG, so no way in.
    api.core.create_namespaced_pod(api.namespace, {"metadata": {"name": "no-token"}, "spec": {
        **spec, "automountServiceAccountToken": False,
        "containers": [{**container, "name": "login", "command": [
            "python", "-c", "import os; print('KUBECONFIG' in os.environ)"]}]}}, _preload_content=False)
    mounts = api.pod("login")["spec"]["containers"][0]["volumeMounts"]
    assert [m["mountPath"] for m in mounts] == ["/var/run/secrets/kubernetes.io/serviceaccount"]

    for name in ("login", "no-token"):
        wait_until(lambda n=name: api.pod(n)["status"].get("phase") in ("Succeeded", "Failed"), timeout=60,
                   message=f"{name} finished:\n{emu.server_log(name)}")
    assert api.pod("login")["status"]["phase"] == "Succeeded", emu.server_log("login")
    result = json.loads(emu.server_log("login").split("RESULT ", 1)[1].splitlines()[0])
    assert sorted(result["pods"]) == ["login", "no-token"] and result["secrets"] == 403  # only the Role's rights
    assert emu.server_log("no-token").splitlines()[-1] == "False"
