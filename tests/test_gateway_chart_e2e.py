"""The chart's gateway on the real node (as tests/test_e2e_local.py installs the chart): `helm install` with
`gateway.enabled=true`, so the operator and two gateway replicas run from the project image with the chart's
ServiceAccounts and RBAC; a LocalModel of two replicas on a shared claim (a small generated GGUF from the
local Hugging Face stand-in); gateway keys as labelled Secrets in the release namespace. Clients reach the
gateway through its Service's ClusterIP (kube-proxy, from the host): the model list, a chat and a stream with
the official openai SDK, 401/403/404 in each family's shape.

Then the LocalModel's pods roll (an env change) while clients keep sending streamed and whole requests
through the gateway: every request gets a complete 200 answer (the old pods finish what they started,
the gateway sends nothing to a terminating pod nor to a new one before the operator has loaded the model),
and at every moment of the rollout at least one pod is Ready (a StatefulSet replaces one pod at a time and
waits for the new one to be Ready, which its readiness gate holds back until the model is loaded).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml
from gateway_support import gateway_key
from hf_hub_server import FakeHub
from kube_cluster import ROOT, KubeCluster
from node_support import POD_TIMEOUT, delete_volumes, pod_log, provide_volume
from operator_e2e_support import TINY_REPO, hub, lm_spec
from operator_support import Api
from project_image import BUILD_TIMEOUT
from real_node import RealNode
from support import wait_until

__all__ = ["hub"]  # fixture

pytestmark = [pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"), pytest.mark.image,
              pytest.mark.timeout(BUILD_TIMEOUT + 1200)]

CHART = ROOT / "charts" / "lmkube"
HELM_WAIT = 240  # under KubeCluster.helm's own 300 s limit
MODEL_KEY = TINY_REPO.lower()
KEY, NARROW_KEY = f"gw-{secrets.token_hex(16)}", f"gw-{secrets.token_hex(16)}"
USER = [{"role": "user", "content": "Say hello."}]
CLIENTS = 4  # requests in flight during the rollout: two streamed, two whole


@dataclass
class Release:
    node: RealNode
    kube: KubeCluster
    name: str
    system_ns: str
    models_ns: str
    base_url: str  # the gateway Service's ClusterIP

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return json.loads(self.kube.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)[
            "items"]

    def logs(self, namespace: str, selector: str) -> str:
        return "\n".join(f"--- {p['metadata']['name']}:\n{pod_log(self.node, namespace, p['metadata']['name'])[-3000:]}"
                         for p in self.pods(namespace, selector))


@pytest.fixture(scope="module")
def release(real_node: RealNode, node_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    kube = real_node.cluster
    suffix = secrets.token_hex(3)
    system_ns, models_ns, name = f"lmkube-gw-{suffix}", f"gw-models-{suffix}", f"gw-{suffix}"
    for namespace in (system_ns, models_ns):
        kube.create_namespace(namespace)
    repository, tag = node_image.rsplit(":", 1)
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "serverImage": {"pullPolicy": "Never"},
        "operator": {"replicas": 1, "watchNamespaces": [models_ns],
                     "extraEnv": [{"name": "LMKUBE_OPERATOR_POLL_SECONDS", "value": "0.5"},
                                  {"name": "LMKUBE_OPERATOR_RESYNC_SECONDS", "value": "3"},
                                  {"name": "LMKUBE_OPERATOR_RETRY_SECONDS", "value": "1"}]},
        "gateway": {"enabled": True},
    }
    values_file = tmp_path_factory.mktemp("gw-chart") / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    try:
        installed = kube.helm("install", name, str(CHART), "-n", system_ns, "-f", str(values_file), "--wait",
                              "--timeout", f"{HELM_WAIT}s", check=False)
        fullname = f"{name}-lmkube-gateway"
        partial = Release(real_node, kube, name, system_ns, models_ns, "")
        assert installed.returncode == 0, (f"helm install failed: {installed.stderr}\n"
                                           f"{partial.logs(system_ns, 'app.kubernetes.io/component=gateway')}")
        service = json.loads(kube.kubectl("get", "service", fullname, "-n", system_ns, "-o", "json").stdout)
        yield Release(real_node, kube, name, system_ns, models_ns,
                      f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}")
    finally:
        kube.helm("uninstall", name, "-n", system_ns, "--wait", check=False)
        for namespace in (system_ns, models_ns):
            kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        delete_volumes(real_node, models_ns)


@pytest.fixture(scope="module")
def model(release: Release, hub: FakeHub) -> Iterator[Api]:
    """LocalModel `chat` (alias gpt-4o-mini): two replicas on a shared claim, Ready; and two gateway keys."""
    api = Api(release.kube, release.models_ns)
    provide_volume(release.node, release.models_ns, "shared-models", access_mode="ReadWriteMany")
    api.core.create_namespaced_persistent_volume_claim(release.models_ns, {
        "metadata": {"name": "shared-models"},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "resources": {"requests": {"storage": "1Gi"}}}})
    api.create_lm("chat", lm_spec(hub, TINY_REPO, replicas=2, contextLength=1024, aliases=["gpt-4o-mini"],
                                  storage={"existingClaim": "shared-models"}))
    try:
        wait_until(lambda: (s := api.status("chat")).get("phase") == "Ready" and s.get("readyReplicas") == 2,
                   timeout=POD_TIMEOUT, interval=0.5,
                   message=f"chat not Ready x2: {api.status('chat')}\n"
                           f"{release.logs(release.system_ns, 'app.kubernetes.io/component=operator')}")
        with release.kube.api_client() as client:
            gateway_key(client, release.system_ns, "team", KEY, namespaces=release.models_ns)
            gateway_key(client, release.system_ns, "narrow", NARROW_KEY, models="someone-else/*")
        yield api
    finally:
        api.delete_lm("chat")
        wait_until(lambda: not api.pods("chat"), timeout=POD_TIMEOUT, message="chat's pods gone")
        api.close()


def test_chart_gateway_routes_the_sdks_with_one_key(release: Release, model: Api) -> None:
    client = openai.OpenAI(base_url=f"{release.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    # The keys are watched: the first list may come before the key Secret has reached both gateway replicas.
    wait_until(lambda: httpx.get(f"{release.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=30).status_code == 200 and
               httpx.get(f"{release.base_url}/v1/models", headers={"Authorization": f"Bearer {NARROW_KEY}"},
                         timeout=30).status_code == 200, timeout=60, message="gateway keys not loaded")
    assert [m.id for m in client.models.list()] == [MODEL_KEY]

    pods = {p["metadata"]["name"] for p in model.pods("chat")}
    answer = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER, max_tokens=8)
    assert answer.headers["x-lmkube-replica"] in pods
    completion = answer.parse()
    assert completion.model == MODEL_KEY and completion.choices[0].message.role == "assistant"
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(model=f"{release.models_ns}/chat", messages=USER, max_tokens=8,
                                                 stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    # 401, 403, 404 in each family's own shape (OpenAI through its SDK, Anthropic's with httpx).
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        openai.OpenAI(base_url=f"{release.base_url}/v1", api_key="gw-wrong", max_retries=0).models.list()
    assert unauthorized.value.body["code"] == "invalid_api_key"
    narrow = openai.OpenAI(base_url=f"{release.base_url}/v1", api_key=NARROW_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        narrow.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=1)
    assert forbidden.value.body["code"] == "model_not_allowed" and forbidden.value.body["param"] == "model"
    assert narrow.models.list().data == []  # a key sees only what it may use
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=USER, max_tokens=1)
    assert missing.value.body["code"] == "model_not_found"
    claude = anthropic.Anthropic(base_url=release.base_url, api_key="gw-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as anthropic_401:
        claude.messages.create(model="gpt-4o-mini", max_tokens=8, messages=USER)
    assert anthropic_401.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                                   "message": "invalid x-api-key"}}
    with pytest.raises(anthropic.PermissionDeniedError) as anthropic_403:
        claude.with_options(api_key=NARROW_KEY).messages.create(model="gpt-4o-mini", max_tokens=8, messages=USER)
    assert anthropic_403.value.body["error"]["type"] == "permission_error"
    with pytest.raises(anthropic.NotFoundError) as anthropic_404:
        claude.with_options(api_key=KEY).messages.create(model="no-such-model", max_tokens=8, messages=USER)
    assert anthropic_404.value.body["error"]["type"] == "not_found_error"
    reply = claude.with_options(api_key=KEY).messages.create(model="gpt-4o-mini", max_tokens=8, messages=USER)
    assert reply.model == MODEL_KEY and reply.usage.output_tokens > 0


@dataclass
class Outcome:
    streamed: bool
    status: int | None
    complete: bool
    replica: str | None
    detail: str


def _one_request(base_url: str, streamed: bool, n: int) -> Outcome:
    body = {"model": "gpt-4o-mini", "max_tokens": 12, "stream": streamed,
            "messages": [{"role": "user", "content": f"Count to ten, request {n}."}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers,
                          timeout=120) as response:
            text = response.read().decode()
            replica = response.headers.get("x-lmkube-replica")
    except httpx.HTTPError as exc:
        return Outcome(streamed, None, False, None, f"{type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return Outcome(streamed, response.status_code, False, replica, text[:500])
    if streamed:
        data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        complete = (bool(data) and data[-1] == "[DONE]" and not any('"error"' in d for d in data)
                    and any('"finish_reason":"' in d for d in data))
    else:
        choice = json.loads(text)["choices"][0]
        complete = choice["finish_reason"] in ("stop", "length")
    return Outcome(streamed, 200, complete, replica, "" if complete else text[-500:])


def _ready_pods(model: Api) -> int:
    return sum(1 for p in model.pods("chat") if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or []))


def test_rolling_update_under_load_answers_every_request(release: Release, model: Api) -> None:
    # A StatefulSet's new pods take the old ones' names (lm-chat-0, -1): uids tell them apart.
    old = {p["metadata"]["uid"] for p in model.pods("chat")}
    assert len(old) == 2
    outcomes: list[Outcome] = []
    ready_seen: list[int] = []
    stop = threading.Event()

    def client(streamed: bool, worker: int) -> None:
        n = 0
        while not stop.is_set():
            outcomes.append(_one_request(release.base_url, streamed, worker * 10_000 + n))
            n += 1

    threads = [threading.Thread(target=client, args=(i % 2 == 0, i), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(outcomes) >= 2 * CLIENTS, timeout=120, message="no requests answered before the roll")
        began = time.monotonic()
        answered_before = len(outcomes)
        # An env change is in the pod spec: the StatefulSet rolls, one old pod going before each new one comes.
        env = [*model.lm("chat")["spec"]["env"], {"name": "LMKUBE_ROLLED", "value": "1"}]
        model.patch_lm("chat", {"env": env})

        def rolled() -> bool:
            ready_seen.append(_ready_pods(model))
            pods = model.pods("chat")
            names = {p["metadata"]["name"] for p in pods}
            uids = {p["metadata"]["uid"] for p in pods}
            status = model.status("chat")
            serving = {r["name"] for r in status.get("pods") or [] if r.get("phase") == "Ready"}
            return len(uids) == 2 and not uids & old and serving >= names and status.get("readyReplicas") == 2

        wait_until(rolled, timeout=2 * POD_TIMEOUT, interval=0.5,
                   message=f"the rollout did not finish: {model.status('chat')}")
        roll_seconds = time.monotonic() - began
        settled = len(outcomes)
        during = settled - answered_before
        wait_until(lambda: len(outcomes) >= settled + 2 * CLIENTS, timeout=120,
                   message="no requests answered after the roll")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    new = {p["metadata"]["name"] for p in model.pods("chat")}
    failed = [o for o in outcomes if o.status != 200 or not o.complete]
    served = {o.replica for o in outcomes}
    print(f"\n[gateway-chart] rollout of 2 replicas under {CLIENTS} clients: {roll_seconds:.1f}s, "
          f"{len(outcomes)} requests ({sum(o.streamed for o in outcomes)} streamed), {len(failed)} failed; "
          f"replicas {sorted(r for r in served if r)}, fewest Ready pods seen {min(ready_seen)}")
    assert not failed, failed[:10]
    assert during > 0 and served >= new, (during, served, new)  # answered while it rolled, by both replicas
    assert min(ready_seen) >= 1, ready_seen  # never a moment without a pod that serves the model
