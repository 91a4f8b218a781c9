"""The real node (tests/real_node.py): kubelet + containerd + runc + a CNI bridge, the real kube-scheduler and
kube-proxy. Pods run a one-file busybox image imported into containerd; the failure modes are the real ones
(the kubelet's ErrImageNeverPull, CrashLoopBackOff, the kernel's OOM killer in a cgroup memory limit, a
failing readiness probe), GPU scheduling is the real scheduler against a Node whose status advertises
`nvidia.com/gpu`, and Services are ClusterIPs programmed by kube-proxy with EndpointSlices from the
controller-manager.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from real_node import BUSYBOX_IMAGE, RealNode
from real_node_config import NODE_IP
from real_node_host import STATE_FILE, RealNodeUnavailable, host_snapshot, preflight, take_lock
from support import wait_until

# Generous: a busy 2-core machine shared with other work.
POD_TIMEOUT = 120


def _apply(node: RealNode, manifest: dict[str, Any]) -> None:
    node.cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def _pod(node: RealNode, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(node.cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)


def _busybox_pod(name: str, script: str, **container: Any) -> dict[str, Any]:
    restart = container.pop("restartPolicy", "Never")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                     "args": [script], **container}]}}


def _container_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return statuses[0]


def _condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == kind), {})


def test_preflight_names_what_is_missing(tmp_path: Path) -> None:
    not_executable = tmp_path / "kubelet"
    not_executable.write_text("")
    with pytest.raises(RealNodeUnavailable) as error:
        preflight({"LMKUBE_KUBELET": str(not_executable)})
    message = str(error.value)
    for key in ("LMKUBE_KUBELET", "LMKUBE_KUBE_SCHEDULER", "LMKUBE_KUBE_PROXY", "LMKUBE_PAUSE", "LMKUBE_BUSYBOX"):
        assert f"{key} missing from scripts/install-test-cluster.sh's output" in message, message


def test_node_is_a_real_kubelet_on_containerd(real_node: RealNode, namespace: str) -> None:
    info = real_node.node()["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://"), info
    assert info["kubeletVersion"] == "v1.37.2", info
    addresses = {a["type"]: a["address"] for a in real_node.node()["status"]["addresses"]}
    assert addresses["InternalIP"] == NODE_IP
    wide = real_node.cluster.kubectl("get", "nodes", "-o", "wide").stdout
    assert "containerd://" in wide, wide

    _apply(real_node, {**_busybox_pod("hello", "id -u; cat /proc/self/cgroup | grep memory; echo done"),
                       "metadata": {"name": "hello", "namespace": namespace}})
    pod = wait_until(lambda: (p := _pod(real_node, namespace, "hello"))["status"].get("phase") == "Succeeded" and p,
                     timeout=POD_TIMEOUT, interval=0.5, message="the busybox pod did not complete")
    assert pod["spec"]["nodeName"] == real_node.name
    assert pod["status"]["podIP"].startswith("10.244.0."), pod["status"]
    logs = real_node.cluster.kubectl("logs", "hello", "-n", namespace).stdout
    # Run by the kubelet (logs through the kubelet API), in the node's pod cgroup tree.
    assert logs.splitlines()[0] == "0" and "/lmkube-test/kubepods" in logs and logs.strip().endswith("done"), logs


def test_gpu_pod_waits_for_advertised_capacity(real_node: RealNode, namespace: str) -> None:
    pod = _busybox_pod("gpu", "sleep 3600", resources={"limits": {"nvidia.com/gpu": "1"}})
    pod["metadata"]["namespace"] = namespace
    _apply(real_node, pod)
    try:
        scheduled = wait_until(lambda: _condition(_pod(real_node, namespace, "gpu"), "PodScheduled").get("reason"),
                               timeout=POD_TIMEOUT, interval=0.5)
        condition = _condition(_pod(real_node, namespace, "gpu"), "PodScheduled")
        assert scheduled == "Unschedulable", condition
        assert "Insufficient nvidia.com/gpu" in condition["message"], condition  # the real scheduler's words
        real_node.set_capacity({"nvidia.com/gpu": "1"})
        wait_until(lambda: _pod(real_node, namespace, "gpu")["status"].get("phase") == "Running",
                   timeout=POD_TIMEOUT, interval=0.5, message="the GPU pod did not run once capacity was added")
        assert real_node.node()["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    finally:
        real_node.cluster.kubectl("delete", "pod", "gpu", "-n", namespace, "--grace-period=0", "--force", check=False)
        real_node.set_capacity({"nvidia.com/gpu": None})


def test_missing_image_is_err_image_never_pull(real_node: RealNode, namespace: str) -> None:
    pod = _busybox_pod("missing", "true")
    pod["metadata"]["namespace"] = namespace
    pod["spec"]["containers"][0]["image"] = "localhost/lmkube-test/not-there:v1"
    _apply(real_node, pod)

    def waiting_reason() -> str | None:
        reason = _container_status(_pod(real_node, namespace, "missing")).get("state", {}).get("waiting", {}) \
            .get("reason")
        return None if reason in (None, "ContainerCreating") else reason

    assert wait_until(waiting_reason, timeout=POD_TIMEOUT, interval=0.5) == "ErrImageNeverPull"
    message = _container_status(_pod(real_node, namespace, "missing"))["state"]["waiting"]["message"]
    assert "localhost/lmkube-test/not-there:v1" in message and "Never" in message, message


def test_crash_loop_backs_off_with_exit_code(real_node: RealNode, namespace: str) -> None:
    pod = _busybox_pod("crash", "echo crashing; exit 3", restartPolicy="Always")
    pod["metadata"]["namespace"] = namespace
    _apply(real_node, pod)

    def backing_off() -> dict[str, Any] | None:
        status = _container_status(_pod(real_node, namespace, "crash"))
        waiting = status.get("state", {}).get("waiting", {})
        return status if waiting.get("reason") == "CrashLoopBackOff" and status.get("restartCount", 0) >= 1 else None

    status = wait_until(backing_off, timeout=POD_TIMEOUT, interval=0.5, message="no CrashLoopBackOff")
    assert status["lastState"]["terminated"]["exitCode"] == 3, status
    assert real_node.cluster.kubectl("logs", "crash", "-n", namespace, "--previous").stdout.strip() == "crashing"


def test_memory_limit_is_enforced_by_the_kernel_oom_killer(real_node: RealNode, namespace: str) -> None:
    # dd's 64 MiB buffer, filled from /dev/zero, cannot fit a 16 MiB cgroup memory limit.
    pod = _busybox_pod("oom", "exec dd if=/dev/zero of=/dev/null bs=64M count=4",
                       resources={"limits": {"memory": "16Mi", "cpu": "500m"}})
    pod["metadata"]["namespace"] = namespace
    _apply(real_node, pod)
    failed = wait_until(lambda: (p := _pod(real_node, namespace, "oom"))["status"].get("phase") == "Failed" and p,
                        timeout=POD_TIMEOUT, interval=0.5, message="the pod did not fail")
    terminated = _container_status(failed)["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled", terminated
    assert terminated["exitCode"] == 137, terminated  # SIGKILL from the kernel


def test_readiness_probe_run_by_the_kubelet(real_node: RealNode, namespace: str) -> None:
    # Not ready until the container creates /tmp/ready (after a few probe periods).
    pod = _busybox_pod("probe", "sleep 6; touch /tmp/ready; sleep 3600", readinessProbe={
        "exec": {"command": ["/bin/sh", "-c", "test -f /tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1})
    pod["metadata"]["namespace"] = namespace
    _apply(real_node, pod)
    wait_until(lambda: _pod(real_node, namespace, "probe")["status"].get("phase") == "Running",
               timeout=POD_TIMEOUT, interval=0.3)
    assert _condition(_pod(real_node, namespace, "probe"), "Ready").get("status") == "False"
    wait_until(lambda: _condition(_pod(real_node, namespace, "probe"), "Ready").get("status") == "True",
               timeout=POD_TIMEOUT, interval=0.5, message="the readiness probe never passed")
    real_node.cluster.kubectl("delete", "pod", "probe", "-n", namespace, "--grace-period=0", "--force")


def test_missing_secret_is_a_config_error_and_liveness_restarts(real_node: RealNode, namespace: str) -> None:
    missing = _busybox_pod("misconfigured", "sleep 3600",
                           env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}])
    missing["metadata"]["namespace"] = namespace
    _apply(real_node, missing)
    # Healthy for a few seconds, then the liveness probe fails: the kubelet kills and restarts the container.
    live = _busybox_pod("liveness", "touch /tmp/alive; sleep 4; rm /tmp/alive; sleep 3600", restartPolicy="Always",
                        livenessProbe={"exec": {"command": ["/bin/sh", "-c", "test -f /tmp/alive"]},
                                       "periodSeconds": 1, "failureThreshold": 2})
    live["metadata"]["namespace"] = namespace
    _apply(real_node, live)

    def config_error() -> dict[str, Any] | None:
        waiting = _container_status(_pod(real_node, namespace, "misconfigured")).get("state", {}).get("waiting", {})
        return waiting if waiting.get("reason") == "CreateContainerConfigError" else None

    waiting = wait_until(config_error, timeout=POD_TIMEOUT, interval=0.5, message="no CreateContainerConfigError")
    assert waiting["message"] == 'secret "absent" not found', waiting
    restarted = wait_until(lambda: _container_status(_pod(real_node, namespace, "liveness")).get("restartCount", 0)
                           >= 1, timeout=POD_TIMEOUT, interval=0.5, message="the liveness probe restarted nothing")
    assert restarted
    events = real_node.cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                                       "involvedObject.name=liveness", "-o", "json").stdout
    assert "Liveness probe failed" in events, events[-3000:]


def _web_deployment(namespace: str, replicas: int = 1) -> list[dict[str, Any]]:
    script = "mkdir -p /tmp/www && echo hello-from-$HOSTNAME > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    labels = {"app": "web"}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": namespace},
         "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "terminationGracePeriodSeconds": 0,
                      "containers": [{"name": "web", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                      "command": ["/bin/busybox", "sh", "-c", script],
                                      "ports": [{"containerPort": 8080}],
                                      "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]


def _ready_pods(node: RealNode, namespace: str, selector: str) -> list[dict[str, Any]]:
    items = json.loads(node.cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)
    return [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")
            and _condition(p, "Ready").get("status") == "True"]


def test_cluster_ip_service_from_host_and_pod_and_recreated_pod(real_node: RealNode, namespace: str) -> None:
    for manifest in _web_deployment(namespace):
        _apply(real_node, manifest)
    (first,) = wait_until(lambda: _ready_pods(real_node, namespace, "app=web"), timeout=POD_TIMEOUT, interval=0.5)
    service = json.loads(real_node.cluster.kubectl("get", "service", "web", "-n", namespace, "-o", "json").stdout)
    cluster_ip = service["spec"]["clusterIP"]

    def endpoint_ips() -> set[str]:
        slices = json.loads(real_node.cluster.kubectl("get", "endpointslices", "-n", namespace,
                                                      "-l", "kubernetes.io/service-name=web", "-o", "json").stdout)
        return {address for item in slices["items"] for endpoint in item.get("endpoints") or []
                if endpoint.get("conditions", {}).get("ready") for address in endpoint["addresses"]}

    wait_until(lambda: endpoint_ips() == {first["status"]["podIP"]}, timeout=POD_TIMEOUT, interval=0.5)

    def served_by(name: str) -> bool:  # through kube-proxy's nft rules, from the host
        try:
            return httpx.get(f"http://{cluster_ip}/", timeout=5).text.strip() == f"hello-from-{name}"
        except httpx.HTTPError:
            return False

    wait_until(lambda: served_by(first["metadata"]["name"]), timeout=POD_TIMEOUT, interval=0.5)

    # A pod on the same bridge reaches the Service too (pod -> ClusterIP -> pod).
    # nc, not wget: busybox-static's wget looks the "http" service up through NSS, which crashes statically.
    client = _busybox_pod("client", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {cluster_ip} 80 | tail -n 1")
    client["metadata"]["namespace"] = namespace
    _apply(real_node, client)
    wait_until(lambda: _pod(real_node, namespace, "client")["status"].get("phase") in ("Succeeded", "Failed"),
               timeout=POD_TIMEOUT, interval=0.5)
    assert real_node.cluster.kubectl("logs", "client", "-n", namespace).stdout.strip() == \
        f"hello-from-{first['metadata']['name']}"

    # A deleted pod is recreated by the ReplicaSet, and the Service follows it.
    real_node.cluster.kubectl("delete", "pod", first["metadata"]["name"], "-n", namespace, "--grace-period=0",
                              "--force")
    (second,) = wait_until(lambda: [p for p in _ready_pods(real_node, namespace, "app=web")
                                    if p["metadata"]["uid"] != first["metadata"]["uid"]],
                           timeout=POD_TIMEOUT, interval=0.5)
    wait_until(lambda: served_by(second["metadata"]["name"]), timeout=POD_TIMEOUT, interval=0.5)


def test_killed_run_is_cleaned_up_and_the_host_left_as_found(real_node: RealNode, namespace: str,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    # A short directory: containerd's sockets live under it, and a unix socket path has at most 107 bytes.
    tmp_path = tmp_path_factory.mktemp("kr")
    before = real_node.host_before
    real_node.stop()
    try:
        killed = RealNode(real_node.cluster, tmp_path / "killed", name="killed-node")
        killed.start()
        # A running pod: containers, overlay mounts, a network namespace and a veth to clean up.
        pod = _busybox_pod("doomed", "sleep 3600")
        pod["metadata"]["namespace"] = namespace
        pod["spec"]["nodeName"] = killed.name
        _apply(real_node, pod)
        wait_until(lambda: _pod(real_node, namespace, "doomed")["status"].get("phase") == "Running",
                   timeout=POD_TIMEOUT, interval=0.5)
        killed.abandon()
        assert STATE_FILE.exists() and host_snapshot() != before

        recovered = RealNode(real_node.cluster, tmp_path / "recovered", name="recovered-node")
        recovered.start()  # cleans up after the killed run first
        assert not (tmp_path / "killed").exists()
        recovered.stop()
        after = host_snapshot()
        assert not STATE_FILE.parent.exists()
        assert after == before, {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    finally:
        real_node.cluster.kubectl("delete", "node", "killed-node", "recovered-node", "--wait=false", check=False)
        real_node.start()


def test_a_run_waiting_for_the_node_takes_the_lock_the_finishing_run_left(tmp_path: Path) -> None:
    """No node needed. A finishing run removes the lock file and its directory (RealNode.stop): the run that
    waited on that file must hold the lock file a third run would open, not the removed one."""
    directory = tmp_path / "state"
    first = take_lock(directory)
    taken: list[object] = []
    waiter = threading.Thread(target=lambda: taken.append(take_lock(directory)))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive()  # waiting for the first run
    (directory / "lock").unlink()
    first.close()
    with contextlib.suppress(OSError):
        directory.rmdir()
    waiter.join(timeout=10)
    (second,) = taken
    assert os.fstat(second.fileno()).st_ino == (directory / "lock").stat().st_ino  # type: ignore[attr-defined]
    second.close()  # type: ignore[attr-defined]
