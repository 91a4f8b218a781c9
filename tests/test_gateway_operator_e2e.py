"""The whole path: `lmkube operator` (with the gateway's credential) runs two LocalModels as pods of the
project image on the real node (tests/real_node.py, as tests/test_operator_e2e.py), and `lmkube gateway`
(discovering them from the real kube-apiserver, with only its own RBAC) routes an OpenAI SDK client to them
with one gateway key; the pods' own tokens stay in their Secrets."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import kubernetes.client
import openai
import pytest
from gateway_support import start_gateway
from hf_hub_server import FakeHub
from kube_cluster import KubeCluster
from lmkube.operator import resources
from node_support import POD_TIMEOUT, delete_volumes, provide_volume
from operator_support import OPERATOR_ACCOUNT, Api, OperatorProcess, grant_operator_rules, install_crd
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from real_node_config import NODE_IP
from support import wait_until
from test_gateway_kube import WATCH, gateway_key

from lmkube.synthetic_gguf import write_llama_model

# The project image: a source change rebuilds it (minutes) before the first pod; `-m "not image"` skips these.
pytestmark = [pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"), pytest.mark.image,
              pytest.mark.timeout(BUILD_TIMEOUT + 900)]

UPSTREAM = f"gw-upstream-{secrets.token_hex(16)}"
KEY = f"gw-{secrets.token_hex(12)}"
REPO = "hub-org/Tiny-GGUF"


@pytest.fixture(scope="module")
def hub(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    d = tmp_path_factory.mktemp("gw-hub")
    hub = FakeHub(host=NODE_IP).start()  # where pods reach the host
    hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": write_llama_model(d / "tiny-Q4_K_M.gguf", seed=21, name="Tiny")})
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def kube(real_node: RealNode) -> KubeCluster:
    """The real node's control plane (this module's `kube` is not the session's node-less one)."""
    return real_node.cluster


@pytest.fixture(scope="module")
def ns(real_node: RealNode, kube: KubeCluster) -> Iterator[str]:
    name = f"gw-e2e-{secrets.token_hex(3)}"
    install_crd(kube)
    kube.create_namespace(name)
    grant_operator_rules(kube, name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
    delete_volumes(real_node, name)


def test_operator_pods_behind_the_gateway(real_node: RealNode, kube: KubeCluster, ns: str, hub: FakeHub,
                                          node_image: str, tmp_path: Path) -> None:
    kubeconfig = kube.service_account_kubeconfig(ns, OPERATOR_ACCOUNT, tmp_path / "operator-kubeconfig")
    operator = OperatorProcess(kubeconfig, ns, tmp_path / "operator.log",
                               env={"LMKUBE_OPERATOR_GATEWAY_TOKEN": UPSTREAM, "LMKUBE_OPERATOR_CPU_IMAGE": node_image,
                                    "LMKUBE_OPERATOR_IMAGE_PULL_POLICY": "Never"})
    operator.start()
    api = Api(kube, ns)
    gateway = None
    try:
        spec = {"model": REPO, "gpu": {"count": 0}, "storage": {"size": "1Gi"}, "contextLength": 512,
                "env": [{"name": "HF_ENDPOINT", "value": hub.url}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]}
        for name in ("chat", "other"):
            provide_volume(real_node, ns, resources.names(name).pvc)
        api.create_lm("chat", {**spec, "aliases": ["gpt-4o-mini"]})
        api.create_lm("other", spec)
        for name in ("chat", "other"):
            wait_until(lambda name=name: api.status(name).get("phase") == "Ready", timeout=POD_TIMEOUT,
                       message=f"{name} not Ready:\n{operator.log()[-4000:]}")

        with kube.api_client() as client:
            kube.kubectl("create", "serviceaccount", "gateway", "-n", ns)
            rbac = kubernetes.client.RbacAuthorizationV1Api(client)
            rbac.create_namespaced_role(ns, {"metadata": {"name": "gateway"}, "rules": WATCH})
            rbac.create_namespaced_role_binding(ns, {
                "metadata": {"name": "gateway"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gateway"},
                "subjects": [{"kind": "ServiceAccount", "name": "gateway", "namespace": ns}]})
            gateway_key(client, ns, "client", KEY, namespaces=ns)
        (tmp_path / "upstream").write_text(UPSTREAM)
        gateway = start_gateway(tmp_path, "--namespace", ns, "--keys-namespace", ns, "--upstream-token-file",
                                str(tmp_path / "upstream"),
                                env={"KUBECONFIG": str(kube.service_account_kubeconfig(ns, "gateway",
                                                                                       tmp_path / "gw-kubeconfig"))})
        client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Hi"}]
        for model in ("gpt-4o-mini", f"{ns}/other", f"{ns}/chat"):
            answer = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=4)
            assert answer.parse().model == "hub-org/tiny-gguf"
            pod = answer.headers["x-lmkube-replica"]
            assert pod.startswith("lm-chat-" if model != f"{ns}/other" else "lm-other-")
        # Both models share a key: by that key alone the request is ambiguous, and the list says namespace/name.
        assert sorted(m.id for m in client.models.list()) == [f"{ns}/chat", f"{ns}/other"]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="hub-org/tiny-gguf", messages=messages, max_tokens=1)

        # The pods take the gateway's credential and their own token, nothing else.
        (ip,) = {p["status"]["podIP"] for p in api.pods("chat")}
        url = f"http://{ip}:1234/v1/models"
        own = base64.b64decode(api.read("Secret", resources.names("chat").secret)["data"]["token"]).decode()
        for token, status in ((UPSTREAM, 200), (own, 200), (KEY, 401)):
            assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == status
        assert api.read("Secret", resources.gateway_secret_name("chat", UPSTREAM)) is not None
    finally:
        if gateway is not None:
            gateway.stop()
        for name in ("chat", "other"):
            api.delete_lm(name)
        wait_until(lambda: not api.pods("chat") and not api.pods("other"), timeout=POD_TIMEOUT)
        operator.stop()
        api.close()
