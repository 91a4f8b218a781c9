"""`reconcile()` in-process, against fakes of the Kubernetes API and of the pods' servers (tests/fake_kube.py):
every phase a LocalModel goes through and every failure it reports, one pass at a time, in milliseconds.
The same behaviour end to end, on a real control plane and real servers: test_operator_e2e.py."""

from __future__ import annotations

import base64

import pytest
from fake_kube import NAMESPACE, FakeCluster, Volume
from lmkube.operator import reconcile as rc
from lmkube.operator import resources
from lmkube.operator.podclient import PodError, PodUnreachable

MODEL = "acme/Tiny-Chat-GGUF"
KEY = "acme/tiny-chat-gguf"
OOM = ('Not enough memory to load "acme/tiny-chat-gguf" with context_length 32768: it needs an estimated '
       '6.20 GiB, and 3.10 GiB of RAM is free.')


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster(retry_seconds=5.0)


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def ready_model(cluster: FakeCluster, name: str = "tiny", **spec: object) -> None:
    """A LocalModel whose pod has the files, after the pass that loads it."""
    cluster.apply(name, {"model": MODEL, **spec})
    cluster.reconcile(name)
    cluster.start_pod(name, f"{name}-0", volume=Volume(files={KEY: "q4_k_m"}))
    assert cluster.reconcile(name)["phase"] == "Ready"


# -- the way to Ready --------------------------------------------------------------------------------


def test_a_new_model_creates_its_objects_and_waits_for_pods(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    status = cluster.reconcile("tiny")
    assert (status["phase"], status["message"]) == ("Pending", "waiting for the StatefulSet to create pods")
    names = resources.names("tiny")
    assert sorted(cluster.kube.writes) == sorted([
        ("create", "Secret", names.secret), ("create", "Service", names.service),
        ("create", "StatefulSet", names.statefulset)])
    assert cluster.token("tiny").startswith("sk-lm-")
    assert cluster.statefulset("tiny")["spec"]["replicas"] == 1
    assert status["readyReplicas"] == 0 and status["endpoint"] is None and status["observedGeneration"] == 1
    assert conditions(status)["Ready"] == ("False", "NoPods")
    assert cluster.events == [("Normal", "Pending", "waiting for the StatefulSet to create pods")]

    cluster.reconcile("tiny")  # nothing changed: no write, no second Event
    assert [w for w in cluster.kube.writes if w[0] == "patch"] == []
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


# -- failures ----------------------------------------------------------------------------------------


def test_a_failed_download_backs_off_then_retries_with_a_new_job(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0")
    cluster.reconcile("tiny")
    server.volume.fail("connection reset by the Hub")
    status = cluster.reconcile("tiny")
    assert (status["phase"], conditions(status)["Ready"]) == ("Failed", ("False", "DownloadFailed"))
    assert status["message"] == "pod tiny-0: download failed: connection reset by the Hub"
    record = status["pods"][0]
    assert (record["attempts"], rc.epoch(record["retryAt"])) == (1, cluster.now + 5)
    assert "jobId" not in record  # forgotten: the retry starts a fresh job
    assert cluster.events[-1] == ("Warning", "DownloadFailed", status["message"])

    asked = len(server.requests)
    cluster.now += 4
    assert cluster.reconcile("tiny")["phase"] == "Failed"
    assert len(server.requests) == asked  # before retryAt the pod is left alone

    cluster.now += 2
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Downloading" and len(server.volume.jobs) == 2


def test_a_download_the_server_refuses_is_failed_with_its_message(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "variant": "Q2_K"})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0")
    server.download_error = PodError("DownloadFailed", "Hugging Face repo 'acme/Tiny-Chat-GGUF' has no 'Q2_K' "
                                                       "GGUF; available quantizations: Q4_K_M, Q8_0.", 400)
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Failed" and conditions(status)["Downloaded"] == ("False", "DownloadFailed")
    assert status["message"].startswith("pod tiny-0: Hugging Face repo 'acme/Tiny-Chat-GGUF' has no 'Q2_K'")

    # The user fixes the spec: a new request is tried at once, whatever the back-off of the old one.
    server.download_error = None
    cluster.apply("tiny", {"model": MODEL, "variant": "Q4_K_M"})
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Downloading" and status["observedGeneration"] == 2


def test_a_load_that_does_not_fit_fails_and_backs_off_doubling(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "contextLength": 32768})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}))
    server.load_error = PodError("LoadFailed", OOM, 409)
    status = cluster.reconcile("tiny")
    message = status["message"]  # in spec terms, then the server's figures; a failed pod is not counted as done
    assert status["phase"] == "Failed" and message.startswith(f"pod tiny-0: not enough memory to load {KEY}: "), message
    assert "needs an estimated 64 MiB" in message and message.endswith(f"(the server: {OOM[:-1]})"), message
    assert conditions(status)["Loaded"] == conditions(status)["Downloaded"] == ("False", "InsufficientMemory")
    assert status["pods"][0]["attempts"] == 1

    cluster.now += 5
    status = cluster.reconcile("tiny")
    record = status["pods"][0]
    assert (record["attempts"], rc.epoch(record["retryAt"])) == (2, cluster.now + 10)
    # Each retry shows Loading while the load request runs, then the failure again.
    assert [e[:2] for e in cluster.events[-4:]] == [("Normal", "Loading"), ("Warning", "InsufficientMemory")] * 2

    server.load_error = None
    cluster.now += 10
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Ready" and "attempts" not in status["pods"][0]


def test_files_gone_from_the_volume_are_downloaded_again(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}))
    server.load_error = PodError("LoadFailed", "Model not found: acme/tiny-chat-gguf", 404)
    assert cluster.reconcile("tiny")["phase"] == "Failed"
    assert "downloaded" not in cluster.status("tiny")["pods"][0]
    server.load_error = None
    del server.volume.files[KEY]
    cluster.now += 5
    assert cluster.reconcile("tiny")["phase"] == "Downloading"


@pytest.mark.parametrize(("reason", "message", "restarts", "last_exit", "want_reason", "want_message"), [
    ("ErrImagePull", "pull access denied", 0, None, "ImagePullFailed",
     "pod tiny-0: cannot pull image 'lmkube/lmkube:test' (ErrImagePull: pull access denied)"),
    ("ImagePullBackOff", "Back-off pulling image", 0, None, "ImagePullFailed",
     "pod tiny-0: cannot pull image 'lmkube/lmkube:test' (ImagePullBackOff: Back-off pulling image)"),
    ("CrashLoopBackOff", "back-off 40s restarting failed container", 4, 137, "CrashLoopBackOff",
     "pod tiny-0: the server keeps crashing (4 restarts; last exit code 137); see kubectl logs --previous"),
    ("CreateContainerConfigError", 'secret "lm-tiny-token" not found', 0, None, "CreateContainerConfigError",
     'pod tiny-0: secret "lm-tiny-token" not found'),
])
def test_pods_that_cannot_run_fail_with_their_reason(cluster: FakeCluster, reason: str, message: str, restarts: int,
                                                      last_exit: int | None, want_reason: str,
                                                      want_message: str) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    cluster.waiting_pod("tiny", "tiny-0", reason, message, restarts=restarts, last_exit=last_exit)
    status = cluster.reconcile("tiny")
    assert (status["phase"], status["message"]) == ("Failed", want_message)
    assert conditions(status)["PodsReady"] == ("False", want_reason)
    assert conditions(status)["Ready"] == ("False", want_reason)
    assert cluster.events[-1] == ("Warning", want_reason, want_message)


def test_an_unschedulable_pod_fails_until_it_is_scheduled(cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "gpu": {"count": 1}})
    cluster.reconcile("tiny")
    cluster.unschedulable_pod("tiny", "tiny-0", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Failed" and conditions(status)["PodsReady"] == ("False", "Unschedulable")
    assert status["message"] == ("pod tiny-0 cannot be scheduled: 0/3 nodes are available: "
                                 "3 Insufficient nvidia.com/gpu.")

    del cluster.kube.objects[("Pod", NAMESPACE, "tiny-0")]  # the GPU node joined: a new pod runs
    cluster.start_pod("tiny", "tiny-1", volume=Volume(files={KEY: "q4_k_m"}))
    assert cluster.reconcile("tiny")["phase"] == "Ready"


@pytest.mark.parametrize("break_it", ["unreachable", "wrong token"])
def test_a_pod_the_operator_cannot_talk_to_is_failed(cluster: FakeCluster, break_it: str) -> None:
    cluster.apply("tiny", {"model": MODEL})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0")
    if break_it == "unreachable":
        server.reachable = False
    else:
        server.token = "sk-lm-another"
    status = cluster.reconcile("tiny")
    want = "PodUnreachable" if break_it == "unreachable" else "Unauthorized"
    assert status["phase"] == "Failed" and conditions(status)["Ready"] == ("False", want)
    assert status["message"] == (
        "cannot reach the server at pod tiny-0: connection refused" if break_it == "unreachable"
        else "the server at pod tiny-0 refused the operator's token (401: Invalid API token)")


def test_invalid_specs_and_missing_secrets_fail_without_touching_pods(cluster: FakeCluster) -> None:
    cluster.apply("shared", {"model": MODEL, "parallel": 0})
    status = cluster.reconcile("shared")
    assert status["phase"] == "Failed" and conditions(status)["Ready"] == ("False", "InvalidSpec")
    assert "spec.parallel must be between 1 and 256" in status["message"]
    assert cluster.kube.writes == []

    cluster.apply("mine", {"model": MODEL, "auth": {"secretRef": {"name": "my-token"}}})
    status = cluster.reconcile("mine")
    assert conditions(status)["Ready"] == ("False", "SecretNotFound")
    assert status["message"] == ("spec.auth.secretRef: Secret 'my-token' with key 'token' not found in "
                                 f"namespace {NAMESPACE}")


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


def test_a_server_the_kernel_killed_while_loading_is_oomkilled_with_its_limit_and_the_estimate(
        cluster: FakeCluster) -> None:
    cluster.apply("tiny", {"model": MODEL, "contextLength": 65536})
    cluster.reconcile("tiny")
    server = cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}))
    cluster.pod("tiny-0")["spec"]["containers"] = [{"name": "lmkube", "resources": {"limits": {"memory": "256Mi"}}}]
    server.estimate_bytes = 327 << 20
    # The kernel kills the server in the middle of the load: the request's connection drops ...
    server.load_error = PodUnreachable("PodUnreachable", "cannot reach the server at pod tiny-0: connection reset")
    assert cluster.reconcile("tiny")["phase"] != "Ready"
    # ... and the kubelet restarts the container, whose last state says why.
    cluster.restart_server("tiny-0")
    cluster.pod("tiny-0")["status"]["containerStatuses"][0]["lastState"] = {
        "terminated": {"reason": "OOMKilled", "exitCode": 137}}
    server.load_error = None
    status = cluster.reconcile("tiny")
    assert status["phase"] == "Failed" and conditions(status)["Ready"][1] == "OOMKilled", status
    assert "256Mi" in status["message"] and "327 MiB" in status["message"] and "65536" in status["message"]
    # The same load would only be killed again: it is not sent to the restarted server.
    assert server.requests.count("POST load") == 1
    cluster.now += 3600
    assert cluster.reconcile("tiny")["phase"] == "Failed" and server.requests.count("POST load") == 1
    # The StatefulSet's new pod (a new memory limit) has the old one's name and volume, not its verdict.
    ip = cluster.pod("tiny-0")["status"]["podIP"]
    del cluster.servers[ip]
    del cluster.kube.objects[("Pod", NAMESPACE, "tiny-0")]
    new = cluster.start_pod("tiny", "tiny-0", volume=Volume(files={KEY: "q4_k_m"}))
    cluster.pod("tiny-0")["metadata"]["uid"] = "uid-tiny-0-again"
    assert cluster.reconcile("tiny")["phase"] == "Ready" and new.requests.count("POST load") == 1


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
