"""The operator end to end on the real node (as tests/test_operator_e2e.py): the failures are the real ones,
each then fixed through the spec: the scheduler's Insufficient nvidia.com/gpu, the server's refusal of a
quantization, an invalid spec or a missing Secret, the kubelet's ErrImageNeverPull and CrashLoopBackOff, the
server's refusal of a load its memory limit cannot hold, the kernel's OOM killer, a token the server refuses.

One namespace and operator for the module; the tests run in file order and each removes its LocalModel(s)
at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hf_hub_server import FakeHub
from node_support import POD_TIMEOUT, kube, node_namespace
from operator_e2e_support import (
    TINY_REPO,
    WIDE_REPO,
    api,
    create_lm,
    delete_and_wait_gone,
    hub,
    lm_spec,
    operator,
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


def test_unschedulable_then_recovers_when_the_node_advertises_a_gpu(real_node: RealNode, api: Api, hub: FakeHub,
                                                                   operator: OperatorProcess) -> None:
    create_lm(real_node, api, "gpu", lm_spec(hub, TINY_REPO, gpu={"count": 1}))
    status = wait_phase(api, operator, "gpu", "Failed", timeout=POD_TIMEOUT)
    status = wait_until(lambda: "nvidia.com/gpu" in (s := api.status("gpu")).get("message", "") and s,
                        timeout=POD_TIMEOUT, interval=0.5, message=f"no GPU message: {api.status('gpu')}")
    assert condition(status, "Ready")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in status["message"], status  # the real scheduler's words
    assert condition(status, "PodsReady") | {} and condition(status, "PodsReady")["status"] == "False"
    warnings = [e for e in api.events("gpu") if e["type"] == "Warning"]
    assert any(e["reason"] == "Unschedulable" for e in warnings), warnings
    (container,) = api.read("StatefulSet", "lm-gpu")["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}

    real_node.set_capacity({"nvidia.com/gpu": "1"})  # as a device plugin would advertise it
    try:
        status = wait_phase(api, operator, "gpu", "Ready")
        assert condition(status, "Ready")["status"] == "True" and status["variant"] == "q4_k_m"
        delete_and_wait_gone(api, "gpu")
    finally:
        real_node.set_capacity({"nvidia.com/gpu": None})


def test_bad_quantization_fails_with_the_servers_message_then_recovers(real_node: RealNode, api: Api, hub: FakeHub,
                                                                       operator: OperatorProcess) -> None:
    create_lm(real_node, api, "badq", lm_spec(hub, TINY_REPO, variant="q9"))
    status = wait_phase(api, operator, "badq", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "DownloadFailed", status
    assert "available quantizations: Q4_K_M, Q8_0" in status["message"], status
    assert condition(status, "Downloaded")["status"] == "False"
    api.patch_lm("badq", {"variant": "Q8_0"})
    status = wait_phase(api, operator, "badq", "Ready", timeout=POD_TIMEOUT)
    assert status["variant"] == "Q8_0"
    delete_and_wait_gone(api, "badq")


def test_invalid_spec_and_missing_secret_fail_without_pods(api: Api, hub: FakeHub, operator: OperatorProcess) -> None:
    # Valid for the CRD's schema, but the model names one variant and spec.variant another.
    api.create_lm("many", lm_spec(hub, f"{TINY_REPO}@q4_k_m", variant="Q8_0"))
    status = wait_phase(api, operator, "many", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "InvalidSpec" and "variant" in status["message"], status
    api.create_lm("nosecret", lm_spec(hub, TINY_REPO, auth={"secretRef": {"name": "later"}}))
    status = wait_phase(api, operator, "nosecret", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "SecretNotFound" and "'later'" in status["message"], status
    assert api.read("StatefulSet", "lm-many") is None and api.read("StatefulSet", "lm-nosecret") is None
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in api.events("many"))
    delete_and_wait_gone(api, "many")
    delete_and_wait_gone(api, "nosecret")


def test_image_not_on_the_node_then_fixed_image(real_node: RealNode, api: Api, hub: FakeHub,
                                                operator: OperatorProcess) -> None:
    # imagePullPolicy Never (the operator's setting here): the kubelet's ErrImageNeverPull, nothing fetched.
    create_lm(real_node, api, "pull", lm_spec(hub, TINY_REPO, image="localhost/lmkube/not-there:missing"))
    status = wait_phase(api, operator, "pull", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "ImagePullFailed", status
    assert "localhost/lmkube/not-there:missing" in status["message"] and "ErrImageNeverPull" in status["message"]
    api.patch_lm("pull", {"image": None})  # back to the operator's image: the StatefulSet rolls
    wait_phase(api, operator, "pull", "Ready", timeout=POD_TIMEOUT)
    delete_and_wait_gone(api, "pull")


def test_crash_loop_fails_then_recovers(real_node: RealNode, api: Api, hub: FakeHub,
                                        operator: OperatorProcess) -> None:
    # An env entry that keeps the interpreter from starting: the container exits at once, again and again.
    crashing = [*lm_spec(hub, TINY_REPO)["env"], {"name": "PYTHONHOME", "value": "/nonexistent"}]
    create_lm(real_node, api, "crash", lm_spec(hub, TINY_REPO, env=crashing))
    status = wait_phase(api, operator, "crash", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "CrashLoopBackOff", status
    assert "keeps crashing" in status["message"] and "kubectl logs --previous" in status["message"]
    api.patch_lm("crash", {"env": lm_spec(hub, TINY_REPO)["env"]})
    wait_phase(api, operator, "crash", "Ready", timeout=POD_TIMEOUT)
    delete_and_wait_gone(api, "crash")


def test_a_load_the_memory_limit_cannot_hold_is_refused_and_an_oomkill_named(real_node: RealNode, api: Api,
                                                                             hub: FakeHub,
                                                                             operator: OperatorProcess) -> None:
    # The server starts within the limit; the model's 64k-token context does not fit what the limit leaves.
    # The server reads its container's memory cgroup and refuses the load (409) instead of being OOMKilled:
    # the status names the limit and the estimate, and the server lives on.
    create_lm(real_node, api, "oom", lm_spec(hub, WIDE_REPO, contextLength=65536,
                                               resources={"limits": {"memory": "256Mi"}}))

    def failed_with(reason: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            status = api.status("oom")
            return status if condition(status, "Ready").get("reason") == reason else None
        return check

    status = wait_until(failed_with("InsufficientMemory"), timeout=POD_TIMEOUT, interval=0.5,
                        message=f"oom not InsufficientMemory: {api.status('oom')}\n{operator.log()[-4000:]}")
    assert status["phase"] == "Failed", status
    message = status["message"]
    assert "not enough memory to load" in message and "memory limit is 256Mi" in message, message
    assert "needs an estimated" in message and "at context length 65536" in message, message
    assert "within the server's memory limit of 0.25 GiB" in message, message  # what the server read in the pod
    assert "raise spec.resources.limits.memory or lower spec.contextLength" in message, message
    (pod,) = api.pods("oom")
    (container,) = pod["status"]["containerStatuses"]
    assert container["restartCount"] == 0 and "terminated" not in container["lastState"], container
    assert any(e["type"] == "Warning" and e["reason"] == "InsufficientMemory" for e in api.events("oom"))

    # A limit the server itself cannot start under: no estimate can help, the kernel's OOM killer ends it,
    # and that is named as such (the kubelet's OOMKilled, exit 137) with the limit to raise.
    api.patch_lm("oom", {"resources": {"limits": {"memory": "40Mi"}}})
    status = wait_until(failed_with("OOMKilled"), timeout=POD_TIMEOUT, interval=0.5,
                        message=f"oom not OOMKilled: {api.status('oom')}\n{operator.log()[-4000:]}")
    assert status["phase"] == "Failed", status
    assert "OOMKilled" in status["message"] and "memory limit (40Mi)" in status["message"], status
    assert "raise spec.resources.limits.memory" in status["message"], status
    (pod,) = [p for p in api.pods("oom") if p["spec"]["containers"][0]["resources"]["limits"]["memory"] == "40Mi"]
    last = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["reason"] == "OOMKilled" and last["exitCode"] == 137, last  # the kernel's, through the kubelet
    assert any(e["type"] == "Warning" and e["reason"] == "OOMKilled" for e in api.events("oom"))

    api.patch_lm("oom", {"resources": {"limits": {"memory": "2Gi"}}})  # a new pod, with room for it
    status = wait_phase(api, operator, "oom", "Ready")
    assert status["contextLength"] == 65536
    delete_and_wait_gone(api, "oom")


def test_token_mismatch_is_unauthorized_until_fixed(real_node: RealNode, api: Api, hub: FakeHub,
                                                    operator: OperatorProcess) -> None:
    api.core.create_namespaced_secret(api.namespace, {"metadata": {"name": "my-token"},
                                                      "stringData": {"api": "sk-lm-mine0000:abcdefghij0123456789"}})
    # A spec.env entry overriding the token the operator injects: the server accepts another token.
    broken = [*lm_spec(hub, TINY_REPO)["env"], {"name": "LMKUBE_API_TOKENS", "value": "sk-lm-other000:x"}]
    create_lm(real_node, api, "auth", lm_spec(hub, TINY_REPO, auth={"secretRef": {"name": "my-token", "key": "api"}},
                                  env=broken))
    status = wait_phase(api, operator, "auth", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "Unauthorized", status
    assert "refused the operator's token (401" in status["message"], status
    assert api.read("Secret", "lm-auth-token") is None  # the user's Secret is used, none generated
    api.patch_lm("auth", {"env": lm_spec(hub, TINY_REPO)["env"]})
    wait_phase(api, operator, "auth", "Ready", timeout=POD_TIMEOUT)
    delete_and_wait_gone(api, "auth")
    assert api.read("Secret", "my-token") is not None  # not the operator's to delete
