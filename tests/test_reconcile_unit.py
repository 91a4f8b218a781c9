"""`reconcile()` in-process, against fakes of the Kubernetes API and of the pods' servers (tests/fake_kube.py):
every phase a LocalModel goes through, one pass at a time, in milliseconds; the failures it reports:
test_reconcile_failures_unit.py. The same behaviour end to end, on a real control plane and real servers:
test_operator_e2e.py."""

from __future__ import annotations

import base64

from fake_kube import NAMESPACE, FakeCluster, Volume
from lmkube.operator import resources
from reconcile_support import KEY, MODEL, conditions, ready_model

# -- the way to Ready --------------------------------------------------------------------------------


def test_a_new_model_creates_its_objects_and_waits_for_pods(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    status = cluster.reconcile("tiny")
    assert (status["phase"], status["message"]) == ("Pending", "waiting for the StatefulSet to create pods")
    names = resources.names("tiny")
    assert sorted(cluster.kube.writes) == sorted([
        ("create", "Secret", names.secret), ("create", "Service", names.service),
        ("create", "StatefulSet", names.statefulset),  # with no replica: its claim first, then scaled
        ("create", "PersistentVolumeClaim", resources.replica_claim("tiny", 0)),
        ("patch", "StatefulSet", names.statefulset)])
    assert cluster.token("tiny").startswith("sk-lm-")
    assert cluster.statefulset("tiny")["spec"]["replicas"] == 1
    assert status["readyReplicas"] == 0 and status["endpoint"] is None and status["observedGeneration"] == 1
    assert conditions(status)["Ready"] == ("False", "NoPods")
    assert cluster.events == [("Normal", "Pending", "waiting for the StatefulSet to create pods")]

    writes = len(cluster.kube.writes)
    cluster.reconcile("tiny")  # nothing changed: no write, no second Event
    assert len(cluster.kube.writes) == writes
    assert len(cluster.kube.status_writes) == 1 and len(cluster.events) == 1


def test_a_pod_that_is_not_ready_yet_is_scheduling(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0", ready=False)
    status = cluster.reconcile("tiny")
    assert (status["phase"], status["message"]) == ("Scheduling", "waiting for pod tiny-0 to become ready")
    assert conditions(status)["PodsReady"] == ("False", "PodsNotReady")
    assert conditions(status)["Downloaded"] == ("Unknown", "NoReadyPods")
    assert server.requests == []  # a pod that is not ready is not asked


def test_download_with_progress_then_load_then_ready(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "contextLength": 8192, "ttl": "30m", "parallel": 2})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0")

    status = cluster.reconcile("tiny")
    assert status["phase"] == "Downloading"
    assert status["download"] == {"downloadedBytes": 0, "totalBytes": 1000, "percent": 0.0, "bytesPerSecond": 100.0}
    job = server.volume.job()
    assert job.request == {"model": MODEL}
    assert cluster.status("tiny")["pods"][0]["jobId"] == job.job_id  # kept for a restarted operator

    server.volume.progress(425)
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Downloading" and status["download"]["percent"] == 42.5
    assert status["message"] == f"pod tiny-0: downloading {MODEL} (42.5% of 1000 bytes)"
    assert conditions(status)["Downloaded"] == ("False", "Downloading")
    assert server.requests.count("POST download") == 1  # the job is polled, not started again

    server.volume.complete()
    written = len(cluster.kube.status_writes)
    status = cluster.reconcile("tiny")
    # One pass: the download is found complete, Loading is published, then the blocking load runs, its
    # progress written to status.load as the server reports it (a write per 5 %, and the end).
    writes = cluster.kube.status_writes[written:]
    assert [w.get("phase") for w in writes] == ["Loading", None, None, None, "Ready"]
    assert writes[0]["load"] == {"percent": 0.0}
    assert [w["load"]["percent"] for w in writes[1:4]] == [30.0, 60.0, 100.0]
    assert status["phase"] == "Ready" and status["readyReplicas"] == 1
    assert status["load"] == {"percent": 100.0}
    assert status["endpoint"] == resources.endpoint("tiny", NAMESPACE)
    assert (status["modelKey"], status["variant"], status["contextLength"]) == (KEY, "q4_k_m", 8192)
    assert status["download"]["percent"] == 100.0
    assert {k: v[0] for k, v in conditions(status).items()} == {
        "PodsReady": "True", "Downloaded": "True", "Loaded": "True", "Ready": "True"}
    assert server.instances[KEY].config == {"gpu": "max", "parallel": 2, "context_length": 8192, "ttl": 1800}
    assert [e[:2] for e in cluster.events] == [("Normal", "Pending"), ("Normal", "Downloading"),
                                               ("Normal", "Loading"), ("Normal", "Ready")]

    settled = len(cluster.kube.status_writes)
    assert cluster.reconcile("tiny")["phase"] == "Ready"  # a settled model: only GET models, no write
    assert server.requests[-1] == "GET models" and server.requests.count("POST load") == 1
    assert len(cluster.kube.status_writes) == settled


def test_files_already_on_the_volume_load_in_the_first_pass(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": f"{MODEL}@Q8_0"})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q8_0"}))
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Ready" and status["variant"] == "Q8_0"
    # The download request finds the files there (`already_downloaded`): no job.
    # The estimate is asked first, so an OOM kill during the load can name what the model needed.
    assert server.requests == ["GET models", "POST download", "POST load estimate_only", "POST load", "GET models"]
    assert server.volume.jobs == {}


def test_a_restarted_operator_polls_the_same_download_job(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0")
    cluster.reconcile("tiny")
    job = server.volume.job().job_id
    restarted = FakeCluster()  # a new operator process: all it has is what the API server stores
    restarted.kube, restarted.servers, restarted.now = cluster.kube, cluster.servers, cluster.now
    server.volume.progress(500)
    assert restarted.reconcile("tiny")["download"]["percent"] == 50.0
    assert server.requests[-1] == f"GET download {job}" and len(server.volume.jobs) == 1


def test_a_download_paused_by_a_server_restart_is_resumed(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0")
    cluster.reconcile("tiny")
    server.volume.progress(300)
    server.volume.job().status = "paused"
    cluster.restart_server("tiny-0")
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Downloading" and status["download"]["percent"] == 30.0
    assert server.requests.count("POST download") == 2 and len(server.volume.jobs) == 1  # the same job


# -- changes while it runs ---------------------------------------------------------------------------


def test_a_new_load_setting_reloads_on_the_same_pod(cluster: FakeCluster) -> None:
    ready_model(cluster, contextLength=4096)
    server = next(iter(cluster.servers.values()))
    template = cluster.statefulset("tiny")["spec"]["template"]
    cluster.apply("tiny", {"model": MODEL, "contextLength": 16384})
    status = cluster.reconcile("tiny")
    assert cluster.statefulset("tiny")["spec"]["template"] == template  # a load setting: no new pod
    assert status["phase"] == "Ready" and status["contextLength"] == 16384
    assert list(server.instances) == [KEY] and server.instances[KEY].context_length == 16384
    assert server.requests[-5:] == ["GET models", "POST unload acme/tiny-chat-gguf", "POST load estimate_only",
                                    "POST load", "GET models"]


def test_a_new_pod_setting_rolls_the_statefulset(cluster: FakeCluster) -> None:
    ready_model(cluster)
    cluster.apply("tiny", {"model": MODEL, "image": "registry.local/lmkube:next"})
    status = cluster.reconcile("tiny")
    assert ("patch", "StatefulSet", resources.names("tiny").statefulset) in cluster.kube.writes
    container = cluster.statefulset("tiny")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.local/lmkube:next"
    # The old pod belongs to the old template: it no longer counts, the new one is awaited.
    assert (status["phase"], status["readyReplicas"]) == ("Pending", 0)
    cluster.start_pod("tiny", "tiny-new", volume=Volume(files={KEY: "q4_k_m"}))
    assert cluster.reconcile("tiny")["phase"] == "Ready"


def test_during_a_rollout_the_old_pods_stay_listed_serving_until_they_go(cluster: FakeCluster) -> None:
    shared = {"model": MODEL, "replicas": 2, "storage": {"existingClaim": "shared-models"}, "gpu": {"count": 0}}
    cluster.apply("tiny", shared)
    cluster.reconcile("tiny")
    volume = Volume(files={KEY: "q4_k_m"})
    for name in ("tiny-a", "tiny-b"):
        cluster.start_pod("tiny", name, volume=volume)
    assert cluster.reconcile("tiny")["readyReplicas"] == 2
    cluster.apply("tiny", {**shared, "image": "registry.local/lmkube:next"})
    cluster.reconcile("tiny")
    assert cluster.statefulset("tiny")["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    # The new template's first pod is ready, not loaded yet: the old pods are still the ones serving.
    cluster.start_pod("tiny", "tiny-c", volume=volume)
    serving = {r["name"]: r["phase"] for r in cluster.reconcile("tiny")["pods"]}
    assert serving == {"tiny-a": "Ready", "tiny-b": "Ready", "tiny-c": "Ready"}
    cluster.pod("tiny-a")["metadata"]["deletionTimestamp"] = "2027-01-15T09:00:00Z"  # the StatefulSet removes one
    status = cluster.reconcile("tiny")
    assert {r["name"] for r in status["pods"]} == {"tiny-b", "tiny-c"}
    assert status["readyReplicas"] == 1  # only the new template's pods count


def test_a_deleted_owned_object_is_recreated(cluster: FakeCluster) -> None:
    ready_model(cluster)
    cluster.kube.delete("Service", NAMESPACE, resources.names("tiny").service)
    cluster.reconcile("tiny")
    assert cluster.kube.get("Service", NAMESPACE, resources.names("tiny").service) is not None


def test_a_users_secret_is_the_token_and_a_new_token_rolls_the_pods(cluster: FakeCluster) -> None:
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "my-token", "namespace": NAMESPACE},
                         "stringData": {"key": "sk-lm-mine"}})
    cluster.apply("tiny", {"model": MODEL, "auth": {"secretRef": {"name": "my-token", "key": "key"}}})
    cluster.reconcile("tiny")
    assert cluster.kube.get("Secret", NAMESPACE, resources.names("tiny").secret) is None  # none of its own
    cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}), token="sk-lm-mine")
    assert cluster.reconcile("tiny")["phase"] == "Ready"  # the pod's server accepts the user's token

    template = cluster.statefulset("tiny")["spec"]["template"]
    cluster.kube.patch("Secret", NAMESPACE, "my-token", {"data": {"key": base64.b64encode(b"sk-lm-new").decode()}})
    status = cluster.reconcile("tiny")
    # The pods read the token at start: a new token is a new pod template, and the old pod no longer counts.
    new_template = cluster.statefulset("tiny")["spec"]["template"]
    hash_key = resources.POD_HASH_ANNOTATION
    assert new_template["metadata"]["annotations"][hash_key] != template["metadata"]["annotations"][hash_key]
    assert (status["phase"], status["readyReplicas"]) == ("Pending", 0)


def test_a_changed_service_is_put_back(cluster: FakeCluster) -> None:
    ready_model(cluster)
    service = resources.names("tiny").service
    want = cluster.kube.get("Service", NAMESPACE, service)
    assert want is not None
    cluster.kube.patch("Service", NAMESPACE, service, {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}})
    cluster.reconcile("tiny")
    live = cluster.kube.get("Service", NAMESPACE, service)
    assert live is not None and live["spec"]["ports"] == want["spec"]["ports"]


def test_a_terminating_pod_is_left_alone(cluster: FakeCluster) -> None:
    ready_model(cluster)
    server = next(iter(cluster.servers.values()))
    asked = len(server.requests)
    cluster.pod("tiny-0")["metadata"]["deletionTimestamp"] = "2027-01-15T10:00:00Z"
    status = cluster.reconcile("tiny")
    assert (status["phase"], status["readyReplicas"]) == ("Pending", 0)
    assert len(server.requests) == asked


def test_a_restarted_server_gets_the_model_loaded_again(cluster: FakeCluster) -> None:
    ready_model(cluster)
    server = next(iter(cluster.servers.values()))
    cluster.restart_server("tiny-0")
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Ready" and server.requests.count("POST load") == 2
    assert server.requests.count("POST download") == 1  # the files are still on the volume


def test_a_model_the_ttl_unloaded_is_idle_and_not_reloaded(cluster: FakeCluster) -> None:
    ready_model(cluster, ttl=600)
    server = next(iter(cluster.servers.values()))
    server.instances.clear()  # the server's idle TTL unloaded it
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Idle" and conditions(status)["Loaded"] == ("False", "IdleUnloaded")
    assert conditions(status)["Ready"] == ("True", "Idle") and status["endpoint"] is not None
    assert server.requests.count("POST load") == 1


def test_scaled_to_zero_is_its_own_phase(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "replicas": 0})
    status = cluster.reconcile("tiny")
    assert (status["phase"], conditions(status)["Ready"]) == ("ScaledToZero", ("False", "ScaledToZero"))
    assert cluster.statefulset("tiny")["spec"]["replicas"] == 0
    # What the scale subresource reports: no pods, and the selector an HPA or KEDA counts pods with.
    assert status["replicas"] == 0
    assert status["selector"] == ("app.kubernetes.io/component=model-server,app.kubernetes.io/instance=tiny,"
                                  "app.kubernetes.io/name=lmkube")


# -- replicas on a shared claim ----------------------------------------------------------------------


def test_replicas_on_a_shared_claim_download_once_and_are_ready_together(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "replicas": 2, "storage": {"existingClaim": "shared-models"}})
    status = cluster.reconcile("tiny")
    assert "volumeClaimTemplates" not in cluster.statefulset("tiny")["spec"]  # every pod mounts the shared claim
    assert cluster.statefulset("tiny")["spec"]["replicas"] == 2
    shared = Volume()
    first = cluster.start_pod("tiny", "tiny-a", volume=shared)
    second = cluster.start_pod("tiny", "tiny-b", volume=shared)

    status = cluster.reconcile("tiny")
    assert status["phase"] == "Downloading"
    assert "POST download" in first.requests and "POST download" not in second.requests
    assert status["pods"][1]["message"] == ("pod tiny-b: waiting for pod tiny-a to download the model to the shared "
                                            "volume")

    shared.complete()
    status = cluster.reconcile("tiny")
    assert (status["phase"], status["readyReplicas"]) == ("Ready", 2)
    assert KEY in first.instances and KEY in second.instances

    cluster.set_ready("tiny-b", False)  # one replica stops serving: not every desired replica serves
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Scheduling" and status["readyReplicas"] == 1
    assert conditions(status)["PodsReady"] == ("False", "PodsNotReady")

    cluster.apply("tiny", {"model": MODEL, "replicas": 3, "storage": {"existingClaim": "shared-models"}})
    cluster.reconcile("tiny")
    assert cluster.statefulset("tiny")["spec"]["replicas"] == 3


# -- deletion ----------------------------------------------------------------------------------------


def test_deleting_unloads_on_every_reachable_pod(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "replicas": 3, "storage": {"existingClaim": "shared-models"}})
    cluster.reconcile("tiny")
    shared = Volume(files={KEY: "q4_k_m"})
    first = cluster.start_pod("tiny", "tiny-a", volume=shared)
    second = cluster.start_pod("tiny", "tiny-b", volume=shared)
    cluster.start_pod("tiny", "tiny-c", volume=shared).reachable = False
    assert cluster.reconcile("tiny")["phase"] == "Failed"  # tiny-c cannot be reached
    assert cluster.unload_all("tiny") == 2
    assert first.instances == {} and second.instances == {}


def test_deleting_a_model_without_pods_needs_no_token(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "auth": {"secretRef": {"name": "gone"}}})
    assert cluster.unload_all("tiny") == 0


def test_a_model_its_pod_fails_waits_for_the_pods_next_event_not_a_poll(cluster: FakeCluster) -> None:
    from lmkube.operator.handlers import Timing

    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    cluster.start_pod("tiny", "tiny-0", ready=False)
    pod = cluster.pod("tiny-0")
    del pod["spec"]["nodeName"]
    pod["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 node(s) were unschedulable."}]}
    status = cluster.reconcile("tiny")
    assert (status["phase"], conditions(status)["Ready"][1]) == ("Failed", "Unschedulable")
    # The scheduler (or the kubelet, for an image pull or a crash loop) changes the pod when anything
    # changes for it: a watch event, so polling would only repeat this pass (200 such models: 0.24 cores).
    assert Timing().next_delay({"phase": "Scheduling"}, status, 2.0, cluster.now) == Timing().resync_seconds
