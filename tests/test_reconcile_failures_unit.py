"""`reconcile()` in-process (tests/fake_kube.py): every failure a LocalModel reports, with its reason and message,
and the back-off before the next try. The way to Ready and the changes while it runs: test_reconcile_unit.py."""

from __future__ import annotations

import pytest
from fake_kube import NAMESPACE, FakeCluster, Volume
from lmkube.operator import clock
from lmkube.operator.podclient import PodError, PodUnreachable
from reconcile_support import KEY, MODEL, conditions

OOM = ('Not enough memory to load "acme/tiny-chat-gguf" with context_length 32768: it needs an estimated '
       '6.20 GiB, and 3.10 GiB of RAM is free.')


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
    assert (record["attempts"], clock.epoch(record["retryAt"])) == (1, cluster.now + 5)
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
    assert (record["attempts"], clock.epoch(record["retryAt"])) == (2, cluster.now + 10)
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

