"""The whole path: `lmkube operator` (with the gateway's credential) runs two LocalModels as pods of the
project image on the real node (tests/real_node.py, as tests/test_operator_e2e.py), and `lmkube gateway`
(discovering them from the real kube-apiserver, with only its own RBAC) routes an OpenAI SDK client to them
with one gateway key; the pods' own tokens stay in their Secrets."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import httpx
import openai
import pytest
from gateway_support import gateway_account, gateway_key, start_gateway
from hf_hub_server import FakeHub
from kube_cluster import KubeCluster
from lmkube.operator import resources
from node_support import POD_TIMEOUT, kube, node_namespace, provide_volume
from operator_e2e_support import TINY_REPO, api, hub, lm_spec, operator
from operator_support import Api, OperatorProcess
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from support import wait_until

__all__ = ["api", "hub", "kube", "node_namespace", "operator"]  # fixtures

# The project image: a source change rebuilds it (minutes) before the first pod; `-m "not image"` skips these.
pytestmark = [pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"), pytest.mark.image,
              pytest.mark.timeout(BUILD_TIMEOUT + 900)]

UPSTREAM = f"gw-upstream-{secrets.token_hex(16)}"
KEY = f"gw-{secrets.token_hex(12)}"
OPERATOR_ENV = {"LMKUBE_OPERATOR_GATEWAY_TOKEN": UPSTREAM}  # read by operator_e2e_support's `operator`


def test_operator_pods_behind_the_gateway(real_node: RealNode, kube: KubeCluster, node_namespace: str, hub: FakeHub,
                                          operator: OperatorProcess, api: Api, tmp_path: Path) -> None:
    ns = node_namespace
    gateway = None
    try:
        spec = lm_spec(hub, TINY_REPO, contextLength=512)
        for name in ("chat", "other"):
            provide_volume(real_node, ns, resources.replica_claim(name, 0))
        api.create_lm("chat", {**spec, "aliases": ["gpt-4o-mini"]})
        api.create_lm("other", spec)
        for name in ("chat", "other"):
            wait_until(lambda name=name: api.status(name).get("phase") == "Ready", timeout=POD_TIMEOUT,
                       message=f"{name} not Ready:\n{operator.log()[-4000:]}")

        gw_kubeconfig = gateway_account(kube, ns, tmp_path / "gw-kubeconfig")
        with kube.api_client() as client:
            gateway_key(client, ns, "client", KEY, namespaces=ns)
        (tmp_path / "upstream").write_text(UPSTREAM)
        gateway = start_gateway(tmp_path, "--namespace", ns, "--keys-namespace", ns, "--upstream-token-file",
                                str(tmp_path / "upstream"), env={"KUBECONFIG": str(gw_kubeconfig)})
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
