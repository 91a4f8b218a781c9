"""The operator end to end: `lmkube operator` (a subprocess, with only the RBAC rules of operator/rbac.py)
against the real control plane, the kubelet emulator running real `lmkube serve` pods, and the local
Hugging Face stand-in the pods download from (HF_ENDPOINT through spec.env, as users point at a mirror).

One namespace, emulator and operator for the module; the tests run in file order and each removes its
LocalModel(s) at the end.
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
from kubelet_emulator import KubeletEmulator
from lmkube.operator import peering, resources
from operator_support import (
    OPERATOR_ACCOUNT,
    Api,
    OperatorProcess,
    condition,
    grant_operator_rules,
    install_crd,
)
from support import wait_until

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

CPU = {"cpu": "8", "memory": "32Gi", "pods": "110"}
BIG = LlamaShape(n_vocab=4096, n_embd=128)  # ~2 MB: a throttled download lasts long enough to watch
TINY_REPO, BIG_REPO, BIG2_REPO = "hub-org/Tiny-GGUF", "hub-org/Big-GGUF", "hub-org/Big2-GGUF"
PHASE_ORDER = ["Pending", "Scheduling", "Downloading", "Loading", "Ready"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    d = tmp_path_factory.mktemp("op-hub")
    hub = FakeHub().start()
    hub.add_repo(TINY_REPO, {"tiny-Q4_K_M.gguf": write_llama_model(d / "tiny-Q4_K_M.gguf", seed=21, name="Tiny"),
                             "tiny-Q8_0.gguf": write_llama_model(d / "tiny-Q8_0.gguf", seed=22, name="Tiny")})
    big = write_llama_model(d / "big-Q4_K_M.gguf", BIG, seed=23, name="Big")
    hub.add_repo(BIG_REPO, {"big-Q4_K_M.gguf": big})
    hub.add_repo(BIG2_REPO, {"big2-Q4_K_M.gguf": write_llama_model(d / "big2-Q4_K_M.gguf", BIG, seed=24, name="B2")})
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def ns(kube: KubeCluster) -> str:
    name = f"op-e2e-{secrets.token_hex(3)}"
    install_crd(kube)
    kube.create_namespace(name)
    grant_operator_rules(kube, name)
    return name


@pytest.fixture(scope="module")
def emu(kube: KubeCluster, ns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeletEmulator]:
    emulator = KubeletEmulator(kube, ns, root=tmp_path_factory.mktemp("op-kubelet"))
    emulator.start()
    emulator.add_node(f"{ns}-cpu", capacity=CPU)
    yield emulator
    emulator.close()
    emulator.check()


@pytest.fixture(scope="module")
def operator(kube: KubeCluster, ns: str, emu: KubeletEmulator,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = kube.service_account_kubeconfig(ns, OPERATOR_ACCOUNT, workdir / "kubeconfig")
    process = OperatorProcess(kubeconfig, ns, workdir / "operator.log")
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


def lm_spec(hub: FakeHub, model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "gpu": {"count": 0}, "storage": {"size": "1Gi"},
            "env": [{"name": "HF_ENDPOINT", "value": hub.url}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}],
            **extra}


def wait_phase(api: Api, operator: OperatorProcess, name: str, phase: str, timeout: float = 60,
               **expect: Any) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = api.status(name)
        if status.get("phase") == phase and all(status.get(k) == v for k, v in expect.items()):
            return status
        return None

    try:
        return wait_until(reached, timeout=timeout, interval=0.1)
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


def delete_and_wait_gone(api: Api, name: str, timeout: float = 180) -> None:
    # Generous: on a loaded 2-core machine the garbage collector (restarted whenever a CRD appears, see
    # tests/kube_cluster.py) took more than 30 s to collect the owned objects.
    api.delete_lm(name)
    n = resources.names(name)
    wait_until(lambda: api.lm(name) is None and not api.pods(name) and all(
        api.read(kind, obj) is None for kind, obj in (("Deployment", n.deployment), ("Service", n.service),
                                                      ("Secret", n.secret))), timeout=timeout,
        message=f"{name} and its objects garbage-collected")


# -- tests, in order -----------------------------------------------------------------------------------


def test_happy_path_download_progress_ready_and_chat(kube: KubeCluster, api: Api, hub: FakeHub,
                                                     operator: OperatorProcess, emu: KubeletEmulator,
                                                     tmp_path: Path) -> None:
    hub.bytes_per_second = 700_000  # ~3 s for the 2 MB model: Downloading is observable
    manifest = tmp_path / "happy.yaml"
    body = {"apiVersion": "lmkube.dev/v1alpha1", "kind": "LocalModel",
            "metadata": {"name": "happy", "namespace": api.namespace},
            "spec": lm_spec(hub, BIG_REPO, contextLength=512)}
    manifest.write_text(json.dumps(body))
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

    wait_until(ready, timeout=90, interval=0.05, message=f"happy Ready; seen {seen}\n{operator.log()[-4000:]}")
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
    (ip,) = emu.service_addresses("lm-happy")
    url = f"http://{ip}:1234/v1/chat/completions"
    chat = {"model": "hub-org/big-gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(url, json=chat, timeout=30).status_code == 401
    answer = httpx.post(url, json=chat, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"


def test_context_length_change_reloads_in_place(api: Api, operator: OperatorProcess, emu: KubeletEmulator) -> None:
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
    wait_until(lambda: api.read("Service", "lm-happy") and api.read("Deployment", "lm-happy"), timeout=30,
               message="Service and Deployment recreated")

    def new_pod_serving() -> dict[str, Any] | None:
        status = api.status("happy")
        pods = [r["name"] for r in status.get("pods") or []]
        fresh = pods and old_pod["metadata"]["name"] not in pods
        return status if fresh and status.get("phase") == "Ready" else None

    # The new pod finds the model on the cache volume and is loaded again (same context length).
    status = wait_until(new_pod_serving, timeout=60, message=f"a new pod Ready: {api.status('happy')}")
    assert status["readyReplicas"] == 1 and status["contextLength"] == 1024
    # The token Secret was never replaced (the volume and the clients keep the same token).
    assert api.read("Secret", "lm-happy-token")["metadata"]["uid"] == old_secret["metadata"]["uid"]


def test_delete_unloads_and_garbage_collects(api: Api, operator: OperatorProcess, emu: KubeletEmulator) -> None:
    (pod,) = api.pods("happy")
    name = pod["metadata"]["name"]
    assert pod_models(pod["status"]["podIP"], token_of(api, "happy"))["hub-org/big-gguf"]["loaded_instances"]
    delete_and_wait_gone(api, "happy")
    assert api.read("PersistentVolumeClaim", "lm-happy-models") is None or \
        api.read("PersistentVolumeClaim", "lm-happy-models")["metadata"].get("deletionTimestamp")
    assert "POST /api/v1/models/unload" in emu.server_log(name), emu.server_log(name)[-3000:]


def test_unschedulable_then_recovers_when_a_gpu_node_appears(api: Api, hub: FakeHub, operator: OperatorProcess,
                                                            emu: KubeletEmulator) -> None:
    api.create_lm("gpu", lm_spec(hub, TINY_REPO, gpu={"count": 1}))
    status = wait_phase(api, operator, "gpu", "Failed", timeout=30)
    assert condition(status, "Ready")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in status["message"], status
    assert condition(status, "PodsReady") | {} and condition(status, "PodsReady")["status"] == "False"
    warnings = [e for e in api.events("gpu") if e["type"] == "Warning"]
    assert any(e["reason"] == "Unschedulable" for e in warnings), warnings
    (container,) = api.read("Deployment", "lm-gpu")["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}

    emu.add_node(f"{api.namespace}-gpu", capacity={**CPU, "nvidia.com/gpu": "1"})
    status = wait_phase(api, operator, "gpu", "Ready", timeout=60)
    assert condition(status, "Ready")["status"] == "True" and status["variant"] == "q4_k_m"
    delete_and_wait_gone(api, "gpu")


def test_bad_quantization_fails_with_the_servers_message_then_recovers(api: Api, hub: FakeHub,
                                                                       operator: OperatorProcess) -> None:
    api.create_lm("badq", lm_spec(hub, TINY_REPO, variant="q9"))
    status = wait_phase(api, operator, "badq", "Failed", timeout=60)
    assert condition(status, "Ready")["reason"] == "DownloadFailed", status
    assert "available quantizations: Q4_K_M, Q8_0" in status["message"], status
    assert condition(status, "Downloaded")["status"] == "False"
    api.patch_lm("badq", {"variant": "Q8_0"})
    status = wait_phase(api, operator, "badq", "Ready", timeout=60)
    assert status["variant"] == "Q8_0"
    delete_and_wait_gone(api, "badq")


def test_invalid_spec_and_missing_secret_fail_without_pods(api: Api, hub: FakeHub, operator: OperatorProcess) -> None:
    # Valid for the CRD's schema, but the operator's own cache volume is ReadWriteOnce.
    api.create_lm("many", lm_spec(hub, TINY_REPO, replicas=2))
    status = wait_phase(api, operator, "many", "Failed", timeout=30)
    assert condition(status, "Ready")["reason"] == "InvalidSpec" and "existingClaim" in status["message"], status
    api.create_lm("nosecret", lm_spec(hub, TINY_REPO, auth={"secretRef": {"name": "later"}}))
    status = wait_phase(api, operator, "nosecret", "Failed", timeout=30)
    assert condition(status, "Ready")["reason"] == "SecretNotFound" and "'later'" in status["message"], status
    assert api.read("Deployment", "lm-many") is None and api.read("Deployment", "lm-nosecret") is None
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in api.events("many"))
    delete_and_wait_gone(api, "many")
    delete_and_wait_gone(api, "nosecret")


def test_operator_restart_mid_download_keeps_the_job(api: Api, hub: FakeHub, operator: OperatorProcess,
                                                     emu: KubeletEmulator) -> None:
    hub.bytes_per_second = 300_000  # ~7 s
    try:
        api.create_lm("resume", lm_spec(hub, BIG2_REPO))
        status = wait_phase(api, operator, "resume", "Downloading", timeout=60)
        wait_until(lambda: (api.status("resume").get("pods") or [{}])[0].get("jobId"), timeout=10)
        job = api.status("resume")["pods"][0]["jobId"]
        operator.stop(signal.SIGKILL)
        time.sleep(1)
        operator.start()
        status = wait_phase(api, operator, "resume", "Ready", timeout=60)
    finally:
        hub.bytes_per_second = None
    assert status["pods"][0]["jobId"] == job
    table = json.loads((emu.volume_dir("lm-resume-models") / ".lmkube" / "downloads.json").read_text())
    assert [j["job_id"] for j in table["jobs"]] == [job], table
    blob = [path for path, _ in hub.blob_requests()]
    assert len(blob) == len(set(blob)), hub.blob_requests()  # each file fetched once, never restarted
    delete_and_wait_gone(api, "resume")


def test_two_replicas_on_a_shared_claim_both_load(api: Api, hub: FakeHub, operator: OperatorProcess) -> None:
    api.core.create_namespaced_persistent_volume_claim(api.namespace, {
        "metadata": {"name": "shared-models"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    api.create_lm("pair", lm_spec(hub, TINY_REPO, replicas=2, storage={"existingClaim": "shared-models"}))
    status = wait_phase(api, operator, "pair", "Ready", timeout=90, readyReplicas=2)
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


def test_ttl_idle_unload_shows_idle_then_jit_reload(api: Api, hub: FakeHub, operator: OperatorProcess,
                                                    emu: KubeletEmulator) -> None:
    began = time.monotonic()
    api.create_lm("idle", lm_spec(hub, TINY_REPO, ttl="2s"))
    wait_phase(api, operator, "idle", "Ready", timeout=60)
    print(f"\n[operator-e2e] create -> Ready, unthrottled {hub_size(hub, TINY_REPO)} byte model: "
          f"{time.monotonic() - began:.2f}s")
    status = wait_phase(api, operator, "idle", "Idle", timeout=30)
    assert condition(status, "Loaded")["reason"] == "IdleUnloaded"
    assert condition(status, "Ready")["status"] == "True"  # the server still answers: it loads on demand
    (ip,) = emu.service_addresses("lm-idle")
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

    wait_until(in_use_and_ready, timeout=30, interval=0.2, message=f"Ready after a JIT load: {api.status('idle')}")
    delete_and_wait_gone(api, "idle")


def test_image_pull_failure_then_fixed_image(api: Api, hub: FakeHub, operator: OperatorProcess,
                                             emu: KubeletEmulator) -> None:
    emu.unpullable_images.add("registry.invalid/lmkube:missing")
    api.create_lm("pull", lm_spec(hub, TINY_REPO, image="registry.invalid/lmkube:missing"))
    status = wait_phase(api, operator, "pull", "Failed", timeout=30)
    assert condition(status, "Ready")["reason"] == "ImagePullFailed", status
    assert "registry.invalid/lmkube:missing" in status["message"]
    api.patch_lm("pull", {"image": None})  # back to the operator's image: the Deployment rolls
    wait_phase(api, operator, "pull", "Ready", timeout=60)
    delete_and_wait_gone(api, "pull")


def test_crash_loop_fails_then_recovers(api: Api, hub: FakeHub, operator: OperatorProcess) -> None:
    # An env entry that keeps the interpreter from starting: the container exits at once, again and again.
    crashing = [*lm_spec(hub, TINY_REPO)["env"], {"name": "PYTHONHOME", "value": "/nonexistent"}]
    api.create_lm("crash", lm_spec(hub, TINY_REPO, env=crashing))
    status = wait_phase(api, operator, "crash", "Failed", timeout=60)
    assert condition(status, "Ready")["reason"] == "CrashLoopBackOff", status
    assert "keeps crashing" in status["message"] and "kubectl logs --previous" in status["message"]
    api.patch_lm("crash", {"env": lm_spec(hub, TINY_REPO)["env"]})
    wait_phase(api, operator, "crash", "Ready", timeout=60)
    delete_and_wait_gone(api, "crash")


def test_token_mismatch_is_unauthorized_until_fixed(api: Api, hub: FakeHub, operator: OperatorProcess) -> None:
    api.core.create_namespaced_secret(api.namespace, {"metadata": {"name": "my-token"},
                                                      "stringData": {"api": "sk-lm-mine0000:abcdefghij0123456789"}})
    # A spec.env entry overriding the token the operator injects: the server accepts another token.
    broken = [*lm_spec(hub, TINY_REPO)["env"], {"name": "LMKUBE_API_TOKENS", "value": "sk-lm-other000:x"}]
    api.create_lm("auth", lm_spec(hub, TINY_REPO, auth={"secretRef": {"name": "my-token", "key": "api"}},
                                  env=broken))
    status = wait_phase(api, operator, "auth", "Failed", timeout=60)
    assert condition(status, "Ready")["reason"] == "Unauthorized", status
    assert "refused the operator's token (401" in status["message"], status
    assert api.read("Secret", "lm-auth-token") is None  # the user's Secret is used, none generated
    api.patch_lm("auth", {"env": lm_spec(hub, TINY_REPO)["env"]})
    wait_phase(api, operator, "auth", "Ready", timeout=60)
    delete_and_wait_gone(api, "auth")
    assert api.read("Secret", "my-token") is not None  # not the operator's to delete


def test_peering_one_active_replica_and_failover(kube: KubeCluster, api: Api, hub: FakeHub,
                                                 operator: OperatorProcess, tmp_path: Path) -> None:
    """Two `--peering` replicas: the higher priority one works, the other stands by and takes over when it stops."""
    (tmp_path / "peering.yaml").write_text(peering.render())
    kube.kubectl("apply", "-f", str(tmp_path / "peering.yaml"))
    kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=120s")
    api.custom.create_namespaced_custom_object(peering.GROUP, peering.VERSION, api.namespace, "kopfpeerings",
                                               peering.peering_object("lmkube", api.namespace))
    operator.stop()
    replicas = [OperatorProcess(operator.kubeconfig, api.namespace, tmp_path / f"{name}.log",
                                args=("--peering", "lmkube", "--priority", str(priority)))
                for name, priority in (("high", 200), ("low", 100))]
    try:
        for replica in replicas:
            replica.start()
        high, low = replicas
        resumed = "Resuming operations after the pause"  # kopf starts paused until it has seen the peers
        wait_until(lambda: resumed in high.log(), timeout=120, message=f"high-priority replica active:\n{high.log()}")
        api.create_lm("peer", lm_spec(hub, TINY_REPO))
        wait_phase(api, high, "peer", "Ready", timeout=180)
        assert resumed not in low.log() and "/peer" not in low.log(), low.log()  # the standby did nothing
        high.stop()  # a graceful stop leaves the peering: the standby resumes at once
        wait_until(lambda: "Resuming operations after the pause" in low.log(), timeout=120,
                   message=f"standby resumes:\n{low.log()[-3000:]}")
        api.patch_lm("peer", {"contextLength": 256})
        wait_phase(api, low, "peer", "Ready", timeout=180, contextLength=256)
        delete_and_wait_gone(api, "peer")
    finally:
        for replica in replicas:
            replica.stop()
        operator.start()
