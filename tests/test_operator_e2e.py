"""The operator end to end on the real node: `lmkube operator` (a subprocess on the host, with only the RBAC
rules of operator/rbac.py) against the real node's control plane; the model-server pods run the project's
image (tests/conftest.py `node_image`) under the real kube-scheduler, kubelet, containerd and runc, on
statically provisioned hostPath volumes (tests/node_support.py); they download from the local Hugging Face
stand-in at the node's bridge address (HF_ENDPOINT through spec.env, as users point at a mirror). The
failures are the real ones: the scheduler's Insufficient nvidia.com/gpu, the kubelet's ErrImageNeverPull and
CrashLoopBackOff, the kernel's OOM killer.

One namespace and operator for the module; the tests run in file order and each removes its LocalModel(s)
at the end.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hf_hub_server import FakeHub
from kube_cluster import KubeCluster
from lmkube.operator import peering, resources
from node_support import POD_TIMEOUT, LogFollower, delete_volumes, provide_volume, service_addresses
from operator_support import (
    OPERATOR_ACCOUNT,
    Api,
    OperatorProcess,
    condition,
    grant_operator_rules,
    install_crd,
)
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from real_node_config import NODE_IP
from support import wait_until

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

# The project image: a source change rebuilds it (minutes) before the first pod; `-m "not image"` skips these.
pytestmark = [pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"), pytest.mark.image,
              pytest.mark.timeout(BUILD_TIMEOUT + 900)]

BIG = LlamaShape(n_vocab=4096, n_embd=128)  # ~2 MB: a throttled download lasts long enough to watch
# Small weights, a long context: its KV cache alone (8 layers x 8 KV heads x 16 x 2 x 2 bytes = 4 KiB per token,
# 256 MiB at 64k tokens, zeroed by llama.cpp at load; the server's estimate: 327 MiB) takes an idle server
# (~90 MiB RSS) past a 256 MiB memory limit (measured: ~355 MiB RSS once loaded).
WIDE = LlamaShape(n_embd=128, n_layer=8, n_head=8, n_head_kv=8, n_ctx_train=65536)
TINY_REPO, BIG_REPO, BIG2_REPO, WIDE_REPO = ("hub-org/Tiny-GGUF", "hub-org/Big-GGUF", "hub-org/Big2-GGUF",
                                             "hub-org/Wide-GGUF")
PHASE_ORDER = ["Pending", "Scheduling", "Downloading", "Loading", "Ready"]


@pytest.fixture(scope="module")
def hub(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    d = tmp_path_factory.mktemp("op-hub")
    hub = FakeHub(host=NODE_IP).start()  # where pods reach the host
    hub.add_repo(TINY_REPO, {"tiny-Q4_K_M.gguf": write_llama_model(d / "tiny-Q4_K_M.gguf", seed=21, name="Tiny"),
                             "tiny-Q8_0.gguf": write_llama_model(d / "tiny-Q8_0.gguf", seed=22, name="Tiny")})
    big = write_llama_model(d / "big-Q4_K_M.gguf", BIG, seed=23, name="Big")
    hub.add_repo(BIG_REPO, {"big-Q4_K_M.gguf": big})
    hub.add_repo(BIG2_REPO, {"big2-Q4_K_M.gguf": write_llama_model(d / "big2-Q4_K_M.gguf", BIG, seed=24, name="B2")})
    hub.add_repo(WIDE_REPO, {"wide-Q4_K_M.gguf": write_llama_model(d / "wide-Q4_K_M.gguf", WIDE, seed=25, name="W")})
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def kube(real_node: RealNode) -> KubeCluster:
    """The real node's control plane (this module's `kube` is not the session's node-less one)."""
    return real_node.cluster


@pytest.fixture(scope="module")
def ns(real_node: RealNode, kube: KubeCluster) -> Iterator[str]:
    name = f"op-e2e-{secrets.token_hex(3)}"
    install_crd(kube)
    kube.create_namespace(name)
    grant_operator_rules(kube, name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
    delete_volumes(real_node, name)


@pytest.fixture(scope="module")
def operator(kube: KubeCluster, ns: str, node_image: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = kube.service_account_kubeconfig(ns, OPERATOR_ACCOUNT, workdir / "kubeconfig")
    # The node has no GPU image and no registry: GPU pods run the CPU image (a GPU is only advertised).
    images = {"LMKUBE_OPERATOR_CPU_IMAGE": node_image, "LMKUBE_OPERATOR_CUDA_IMAGE": node_image,
              "LMKUBE_OPERATOR_IMAGE_PULL_POLICY": "Never"}
    process = OperatorProcess(kubeconfig, ns, workdir / "operator.log", env=images)
    process.start()
    yield process
    process.stop()
    log = process.log()
    assert "Forbidden" not in log and " 403" not in log, log[-6000:]


@pytest.fixture(scope="module")
def api(kube: KubeCluster, ns: str) -> Iterator[Api]:
    api = Api(kube, ns)
    yield api
    api.close()


def create_lm(node: RealNode, api: Api, name: str, spec: dict[str, Any]) -> Path | None:
    """Creates the LocalModel with a volume for its cache claim (none for an existingClaim); returns its directory."""
    volume = None
    if not (spec.get("storage") or {}).get("existingClaim"):
        volume = provide_volume(node, api.namespace, resources.names(name).pvc)
    api.create_lm(name, spec)
    return volume


def lm_spec(hub: FakeHub, model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "gpu": {"count": 0}, "storage": {"size": "1Gi"},
            "env": [{"name": "HF_ENDPOINT", "value": hub.url}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}],
            **extra}


def wait_phase(api: Api, operator: OperatorProcess, name: str, phase: str, timeout: float = POD_TIMEOUT,
               **expect: Any) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = api.status(name)
        if status.get("phase") == phase and all(status.get(k) == v for k, v in expect.items()):
            return status
        return None

    try:
        return wait_until(reached, timeout=timeout, interval=0.2)
    except TimeoutError:
        raise AssertionError(f"{name} not {phase} {expect} after {timeout}s: {json.dumps(api.status(name), indent=1)}"
                             f"\n--- operator log:\n{operator.log()[-5000:]}") from None


def token_of(api: Api, name: str) -> str:
    secret = api.read("Secret", resources.names(name).secret)
    assert secret is not None
    import base64

    return base64.b64decode(secret["data"]["token"]).decode()


def pod_models(ip: str, token: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"http://{ip}:1234/api/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return {m["key"]: m for m in r.json()["models"]}


def hub_size(hub: FakeHub, repo: str) -> int:
    return max(len(data) for data in hub.repos[repo.lower()].files.values())


def delete_and_wait_gone(api: Api, name: str, timeout: float = POD_TIMEOUT) -> None:
    # Generous: on a loaded 2-core machine the garbage collector (restarted whenever a CRD appears, see
    # tests/kube_cluster.py) took more than 30 s to collect the owned objects.
    api.delete_lm(name)
    n = resources.names(name)
    wait_until(lambda: api.lm(name) is None and not api.pods(name) and all(
        api.read(kind, obj) is None for kind, obj in (("Deployment", n.deployment), ("Service", n.service),
                                                      ("Secret", n.secret))), timeout=timeout,
        message=f"{name} and its objects garbage-collected")


# -- tests, in order -----------------------------------------------------------------------------------


def test_happy_path_download_progress_ready_and_chat(real_node: RealNode, kube: KubeCluster, api: Api, hub: FakeHub,
                                                     operator: OperatorProcess, tmp_path: Path) -> None:
    hub.bytes_per_second = 700_000  # ~3 s for the 2 MB model: Downloading is observable
    manifest = tmp_path / "happy.yaml"
    body = {"apiVersion": "lmkube.dev/v1alpha1", "kind": "LocalModel",
            "metadata": {"name": "happy", "namespace": api.namespace},
            "spec": lm_spec(hub, BIG_REPO, contextLength=512)}
    manifest.write_text(json.dumps(body))
    provide_volume(real_node, api.namespace, "lm-happy-models")
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
    deployment = api.read("Deployment", "lm-happy")
    assert deployment["metadata"]["ownerReferences"][0]["name"] == "happy"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in container["env"]}
    assert env["LMKUBE_API_TOKENS"]["valueFrom"]["secretKeyRef"] == {"name": "lm-happy-token", "key": "token"}
    assert env["HF_ENDPOINT"]["value"] == hub.url
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        "lm-happy-models"
    assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {}))  # gpu.count 0
    assert api.read("PersistentVolumeClaim", "lm-happy-models")["spec"]["resources"]["requests"]["storage"] == "1Gi"
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
    assert same["metadata"]["name"] == pod["metadata"]["name"]  # reloaded through the API, not rolled
    instances = pod_models(same["status"]["podIP"], token)["hub-org/big-gguf"]["loaded_instances"]
    assert [i["config"]["context_length"] for i in instances] == [1024]


def test_deleted_owned_objects_come_back(api: Api, operator: OperatorProcess) -> None:
    (old_pod,) = api.pods("happy")
    old_secret = api.read("Secret", "lm-happy-token")
    api.core.delete_namespaced_service("lm-happy", api.namespace)
    api.apps.delete_namespaced_deployment("lm-happy", api.namespace)
    wait_until(lambda: api.read("Service", "lm-happy") and api.read("Deployment", "lm-happy"), timeout=POD_TIMEOUT,
               message="Service and Deployment recreated")

    def new_pod_serving() -> dict[str, Any] | None:
        status = api.status("happy")
        pods = [r["name"] for r in status.get("pods") or []]
        fresh = pods and old_pod["metadata"]["name"] not in pods
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
    assert api.read("PersistentVolumeClaim", "lm-happy-models") is None or \
        api.read("PersistentVolumeClaim", "lm-happy-models")["metadata"].get("deletionTimestamp")
    assert "POST /api/v1/models/unload" in log, log[-3000:]


def test_unschedulable_then_recovers_when_the_node_advertises_a_gpu(real_node: RealNode, api: Api, hub: FakeHub,
                                                                   operator: OperatorProcess) -> None:
    create_lm(real_node, api, "gpu", lm_spec(hub, TINY_REPO, gpu={"count": 1}))
    # The first attempt may still see the cache claim unbound; then the scheduler says what is missing.
    status = wait_phase(api, operator, "gpu", "Failed", timeout=POD_TIMEOUT)
    status = wait_until(lambda: "nvidia.com/gpu" in (s := api.status("gpu")).get("message", "") and s,
                        timeout=POD_TIMEOUT, interval=0.5, message=f"no GPU message: {api.status('gpu')}")
    assert condition(status, "Ready")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in status["message"], status  # the real scheduler's words
    assert condition(status, "PodsReady") | {} and condition(status, "PodsReady")["status"] == "False"
    warnings = [e for e in api.events("gpu") if e["type"] == "Warning"]
    assert any(e["reason"] == "Unschedulable" for e in warnings), warnings
    (container,) = api.read("Deployment", "lm-gpu")["spec"]["template"]["spec"]["containers"]
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
    # Valid for the CRD's schema, but the operator's own cache volume is ReadWriteOnce.
    api.create_lm("many", lm_spec(hub, TINY_REPO, replicas=2))
    status = wait_phase(api, operator, "many", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "InvalidSpec" and "existingClaim" in status["message"], status
    api.create_lm("nosecret", lm_spec(hub, TINY_REPO, auth={"secretRef": {"name": "later"}}))
    status = wait_phase(api, operator, "nosecret", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "SecretNotFound" and "'later'" in status["message"], status
    assert api.read("Deployment", "lm-many") is None and api.read("Deployment", "lm-nosecret") is None
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in api.events("many"))
    delete_and_wait_gone(api, "many")
    delete_and_wait_gone(api, "nosecret")


def test_operator_restart_mid_download_keeps_the_job(real_node: RealNode, api: Api, hub: FakeHub,
                                                     operator: OperatorProcess) -> None:
    hub.bytes_per_second = 200_000  # ~10 s
    try:
        volume = create_lm(real_node, api, "resume", lm_spec(hub, BIG2_REPO))
        assert volume is not None
        status = wait_phase(api, operator, "resume", "Downloading", timeout=POD_TIMEOUT)
        wait_until(lambda: (api.status("resume").get("pods") or [{}])[0].get("jobId"), timeout=30)
        job = api.status("resume")["pods"][0]["jobId"]
        operator.stop(signal.SIGKILL)
        time.sleep(1)
        operator.start()
        status = wait_phase(api, operator, "resume", "Ready", timeout=POD_TIMEOUT)
    finally:
        hub.bytes_per_second = None
    assert status["pods"][0]["jobId"] == job
    table = json.loads((volume / ".lmkube" / "downloads.json").read_text())
    assert [j["job_id"] for j in table["jobs"]] == [job], table
    blob = [path for path, _ in hub.blob_requests()]
    assert len(blob) == len(set(blob)), hub.blob_requests()  # each file fetched once, never restarted
    delete_and_wait_gone(api, "resume")


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
    assert api.read("PersistentVolumeClaim", "lm-pair-models") is None
    assert len(status["pods"]) == 2
    delete_and_wait_gone(api, "pair")
    # A shared claim is the user's: never deleted with the LocalModel.
    claim = api.read("PersistentVolumeClaim", "shared-models")
    assert claim is not None and not claim["metadata"].get("deletionTimestamp")


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


def test_image_not_on_the_node_then_fixed_image(real_node: RealNode, api: Api, hub: FakeHub,
                                                operator: OperatorProcess) -> None:
    # imagePullPolicy Never (the operator's setting here): the kubelet's ErrImageNeverPull, nothing fetched.
    create_lm(real_node, api, "pull", lm_spec(hub, TINY_REPO, image="localhost/lmkube/not-there:missing"))
    status = wait_phase(api, operator, "pull", "Failed", timeout=POD_TIMEOUT)
    assert condition(status, "Ready")["reason"] == "ImagePullFailed", status
    assert "localhost/lmkube/not-there:missing" in status["message"] and "ErrImageNeverPull" in status["message"]
    api.patch_lm("pull", {"image": None})  # back to the operator's image: the Deployment rolls
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


def test_oom_killed_names_the_memory_limit_and_the_estimate(real_node: RealNode, api: Api, hub: FakeHub,
                                                            operator: OperatorProcess) -> None:
    # The server starts within the limit; loading the model's 64k-token context does not fit: the kernel's
    # OOM killer ends the server (not the load request), the operator does not load it again on that pod.
    create_lm(real_node, api, "oom", lm_spec(hub, WIDE_REPO, contextLength=65536,
                                               resources={"limits": {"memory": "256Mi"}}))

    def oom_killed() -> dict[str, Any] | None:
        status = api.status("oom")
        return status if condition(status, "Ready").get("reason") == "OOMKilled" else None

    status = wait_until(oom_killed, timeout=POD_TIMEOUT, interval=0.5,
                        message=f"oom not OOMKilled: {api.status('oom')}\n{operator.log()[-4000:]}")
    assert status["phase"] == "Failed", status
    message = status["message"]
    assert "OOMKilled" in message and "memory limit is 256Mi" in message, message
    assert "needs an estimated" in message and "at context length 65536" in message, message
    (pod,) = api.pods("oom")
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


def test_peering_one_active_replica_and_failover(real_node: RealNode, kube: KubeCluster, api: Api, hub: FakeHub,
                                                 operator: OperatorProcess, tmp_path: Path) -> None:
    """Two `--peering` replicas: the higher priority one works, the other stands by and takes over when it stops."""
    (tmp_path / "peering.yaml").write_text(peering.render())
    kube.kubectl("apply", "-f", str(tmp_path / "peering.yaml"))
    kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=120s")
    api.custom.create_namespaced_custom_object(peering.GROUP, peering.VERSION, api.namespace, "kopfpeerings",
                                               peering.peering_object("lmkube", api.namespace))
    operator.stop()
    replicas = [OperatorProcess(operator.kubeconfig, api.namespace, tmp_path / f"{name}.log", env=operator.env,
                                args=("--peering", "lmkube", "--priority", str(priority)))
                for name, priority in (("high", 200), ("low", 100))]
    try:
        for replica in replicas:
            replica.start()
        high, low = replicas
        resumed = "Resuming operations after the pause"  # kopf starts paused until it has seen the peers
        wait_until(lambda: resumed in high.log(), timeout=POD_TIMEOUT,
                   message=f"high-priority replica active:\n{high.log()}")
        create_lm(real_node, api, "peer", lm_spec(hub, TINY_REPO))
        wait_phase(api, high, "peer", "Ready", timeout=POD_TIMEOUT)
        assert resumed not in low.log() and "/peer" not in low.log(), low.log()  # the standby did nothing
        high.stop()  # a graceful stop leaves the peering: the standby resumes at once
        wait_until(lambda: "Resuming operations after the pause" in low.log(), timeout=POD_TIMEOUT,
                   message=f"standby resumes:\n{low.log()[-3000:]}")
        api.patch_lm("peer", {"contextLength": 256})
        wait_phase(api, low, "peer", "Ready", timeout=POD_TIMEOUT, contextLength=256)
        delete_and_wait_gone(api, "peer")
    finally:
        for replica in replicas:
            replica.stop()
        operator.start()
