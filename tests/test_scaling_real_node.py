"""Replicas that follow demand, end to end on the real node (tests/real_node.py): `lmkube operator` with its
autoscaler reading the pods' own /metrics, pods of the project image, and `lmkube gateway` in front.

- 16 concurrent streams with targetRequests 4 scale a model from 1 replica up to maxReplicas 3; the operator,
  restarted mid-scale, keeps the count; once the streams stop, the count goes back to 1 after scaleDownDelay.
- A model with minReplicas 0 goes to zero when idle (phase ScaledToZero, its volume kept), and a chat through
  the gateway brings it back and succeeds without downloading the model again.

The times measured here (scale-up reaction, scale-from-zero request -> first token) are printed for the record
only; bench/scaling.py measures the autoscaler's decisions over a load ramp.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from gateway_support import WATCH, GatewayProcess, gateway_account, gateway_key, start_gateway
from hf_hub_server import FakeHub
from kube_cluster import KubeCluster
from lmkube.operator import resources
from node_support import POD_TIMEOUT, kube, node_namespace, provide_volume
from operator_support import OPERATOR_ACCOUNT, Api, OperatorProcess
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from real_node_config import NODE_IP
from support import wait_until

from lmkube.synthetic_gguf import write_llama_model

__all__ = ["kube", "node_namespace"]  # fixtures

pytestmark = [pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"), pytest.mark.image,
              pytest.mark.timeout(BUILD_TIMEOUT + 1200)]

UPSTREAM = f"gw-upstream-{secrets.token_hex(16)}"
KEY = f"gw-{secrets.token_hex(12)}"
REPO = "hub-org/Scale-GGUF"
GATEWAY_RULES = [*WATCH, {"apiGroups": ["lmkube.dev"], "resources": ["localmodels/scale"], "verbs": ["get", "patch"]}]


@pytest.fixture(scope="module", autouse=True)
def image_before_node(built_image: object) -> None:
    """The image (re)built before the node's lock is taken: no other worktree waits on the node for a build."""


@pytest.fixture(scope="module")
def hub(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    d = tmp_path_factory.mktemp("scale-hub")
    hub = FakeHub(host=NODE_IP).start()
    hub.add_repo(REPO, {"scale-Q4_K_M.gguf": write_llama_model(d / "scale-Q4_K_M.gguf", seed=23, name="Scale")})
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def ns(node_namespace: str) -> str:
    return node_namespace


@pytest.fixture(scope="module")
def operator(kube: KubeCluster, ns: str, node_image: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    path = tmp_path_factory.mktemp("scale-operator")
    kubeconfig = kube.service_account_kubeconfig(ns, OPERATOR_ACCOUNT, path / "kubeconfig")
    process = OperatorProcess(kubeconfig, ns, path / "operator.log", env={
        "LMKUBE_OPERATOR_GATEWAY_TOKEN": UPSTREAM, "LMKUBE_OPERATOR_CPU_IMAGE": node_image,
        "LMKUBE_OPERATOR_IMAGE_PULL_POLICY": "Never", "LMKUBE_OPERATOR_AUTOSCALE_INTERVAL": "1"})
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api(kube: KubeCluster, ns: str) -> Iterator[Api]:
    client = Api(kube, ns)
    yield client
    client.close()


@pytest.fixture(scope="module")
def gateway(kube: KubeCluster, ns: str, operator: OperatorProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    path = tmp_path_factory.mktemp("scale-gateway")
    kubeconfig = gateway_account(kube, ns, path / "kubeconfig", rules=GATEWAY_RULES)
    with kube.api_client() as client:
        gateway_key(client, ns, "client", KEY, namespaces=ns)
    (path / "upstream").write_text(UPSTREAM)
    process = start_gateway(path, "--namespace", ns, "--keys-namespace", ns, "--upstream-token-file",
                            str(path / "upstream"), "--scale-from-zero-seconds", str(POD_TIMEOUT),
                            env={"KUBECONFIG": str(kubeconfig)})
    yield process
    process.stop()


def spec(hub: FakeHub, **extra: object) -> dict[str, object]:
    return {"model": REPO, "gpu": {"count": 0}, "contextLength": 1024, "parallel": 4,
            "env": [{"name": "HF_ENDPOINT", "value": hub.url}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}],
            **extra}


def counts(api: Api, name: str) -> tuple[int, int, int]:
    """(spec.replicas, pods, status.readyReplicas)."""
    body = api.lm(name) or {}
    return (body.get("spec", {}).get("replicas", 0), len(api.pods(name)),
            (body.get("status") or {}).get("readyReplicas", 0))


class Streams:
    """`count` clients, each streaming one long chat after another through the gateway until stopped."""

    def __init__(self, gateway: GatewayProcess, model: str, count: int) -> None:
        self.client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
        self.model = model
        self.stop = threading.Event()
        self.finished = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(count)]

    def __enter__(self) -> Streams:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)

    def _client(self, index: int) -> None:
        while not self.stop.is_set():
            try:
                stream = self.client.chat.completions.create(
                    model=self.model, stream=True, max_tokens=600,
                    messages=[{"role": "user", "content": f"Tell story {index}-{self.finished}"}])
                for _ in stream:
                    if self.stop.is_set():
                        stream.close()
                        break
                self.finished += 1
            except openai.OpenAIError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")


def test_sixteen_streams_scale_up_survive_an_operator_restart_and_scale_back_down(
        real_node: RealNode, api: Api, hub: FakeHub, operator: OperatorProcess, gateway: GatewayProcess,
        ns: str) -> None:
    provide_volume(real_node, ns, "shared-models", access_mode="ReadWriteMany")
    api.core.create_namespaced_persistent_volume_claim(ns, {
        "metadata": {"name": "shared-models"},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "resources": {"requests": {"storage": "1Gi"}}}})
    scaling = {"minReplicas": 1, "maxReplicas": 3, "targetRequests": 4, "scaleDownDelay": 20, "window": 6}
    api.create_lm("busy", spec(hub, storage={"existingClaim": "shared-models"}, scaling=scaling))
    wait_until(lambda: api.status("busy").get("phase") == "Ready", timeout=POD_TIMEOUT,
               message=f"not Ready:\n{operator.log()[-4000:]}")
    with Streams(gateway, f"{ns}/busy", 16) as streams:
        began = time.monotonic()
        wait_until(lambda: counts(api, "busy")[0] >= 2, timeout=120,
                   message=f"no scale-up: {api.status('busy')}\n{operator.log()[-3000:]}")
        reaction = time.monotonic() - began
        operator.stop()  # restarted mid-scale: between the first step up and maxReplicas
        operator.start()
        wait_until(lambda: counts(api, "busy") == (3, 3, 3), timeout=POD_TIMEOUT,
                   message=f"not at 3 serving replicas: {counts(api, 'busy')} {api.status('busy')}\n"
                           f"{operator.log()[-3000:]}")
        at_three = time.monotonic() - began
        time.sleep(8)  # the load goes on: 3 replicas stay (no flapping after the restart)
        assert counts(api, "busy")[0] == 3
    assert not streams.errors, streams.errors[:5]
    stopped = time.monotonic()
    wait_until(lambda: counts(api, "busy")[:2] == (1, 1), timeout=POD_TIMEOUT,
               message=f"no scale-down: {api.status('busy')}")
    down = time.monotonic() - stopped
    assert down >= 20, down
    reasons = [e["reason"] for e in sorted(api.events("busy"), key=lambda e: e.get("lastTimestamp") or "")
               if e["reason"] in ("ScaleUp", "ScaleDown")]
    assert reasons[0] == "ScaleUp" and reasons[-1] == "ScaleDown", reasons
    print(f"\n[scaling] 16 streams, target 4: first scale-up after {reaction:.1f} s, 3 replicas serving after "
          f"{at_three:.1f} s (operator restarted between), back to 1 pod {down:.1f} s after the load stopped "
          f"(scaleDownDelay 20 s); {streams.finished} streams finished")
    api.delete_lm("busy")
    wait_until(lambda: not api.pods("busy"), timeout=POD_TIMEOUT)


def test_an_idle_model_goes_to_zero_and_a_chat_through_the_gateway_brings_it_back(
        real_node: RealNode, api: Api, hub: FakeHub, operator: OperatorProcess, gateway: GatewayProcess,
        ns: str) -> None:
    volume = provide_volume(real_node, ns, resources.replica_claim("sleepy", 0))
    scaling = {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelay": 10, "window": 4}
    api.create_lm("sleepy", spec(hub, storage={"size": "1Gi"}, scaling=scaling))
    wait_until(lambda: api.status("sleepy").get("phase") == "Ready", timeout=POD_TIMEOUT,
               message=f"not Ready:\n{operator.log()[-4000:]}")
    downloads = len(hub.blob_requests())
    wait_until(lambda: api.status("sleepy").get("phase") == "ScaledToZero" and not api.pods("sleepy"),
               timeout=POD_TIMEOUT, message=f"not at zero: {api.status('sleepy')}")
    assert any(volume.rglob("*.gguf")), "the model files left the volume"
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0, timeout=POD_TIMEOUT)
    assert [m.id for m in client.models.list()] == ["hub-org/scale-gguf"]  # listed while at zero
    began = time.monotonic()
    stream = client.chat.completions.create(model="sleepy", stream=True, max_tokens=8,
                                            messages=[{"role": "user", "content": "Hi"}])
    first_token = None
    for chunk in stream:
        if first_token is None and chunk.choices and chunk.choices[0].delta.content:
            first_token = time.monotonic() - began
    assert first_token is not None
    assert len(hub.blob_requests()) == downloads  # loaded from the volume, not downloaded again
    status = api.status("sleepy")
    assert status["phase"] == "Ready" and status["scaling"]["lastScaleReason"] == "ScaleFromZero", status
    metrics = httpx.get(f"{gateway.base_url}/metrics", timeout=30).text
    assert f'lmkube_gateway_scale_from_zero_total{{model="{ns}/sleepy"}} 1' in metrics
    print(f"\n[scaling] scale from zero through the gateway, model already on the volume: request -> first token "
          f"{first_token:.1f} s")
    api.delete_lm("sleepy")
    wait_until(lambda: not api.pods("sleepy"), timeout=POD_TIMEOUT)
