"""Unit tests of the gateway's pure parts (resolution, grants, balancing, replicas from pods and status) and
of the operator's side of the gateway credential (the pods accept it besides their own token)."""

from __future__ import annotations

from dataclasses import replace

from lmkube.gateway.balance import Balancer
from lmkube.gateway.catalog import Replica, ServedModel
from lmkube.gateway.keys import KeyRing, grant_from_fields
from lmkube.gateway.kube import served_models
from lmkube.gateway.resolve import resolve, upstream_model
from lmkube.operator import reconcile
from lmkube.operator.resources import gateway_secret, gateway_secret_name, labels, statefulset, token_secret
from lmkube.operator.spec import OperatorSettings, parse_spec

CHAT = ServedModel("team-a", "chat", "acme/tiny-chat", aliases=("gpt-4o-mini",))
TWIN = ServedModel("team-b", "chat", "acme/tiny-chat")


def test_a_model_answers_to_its_key_name_alias_and_namespace_name() -> None:
    for name in ("acme/tiny-chat", "ACME/Tiny-Chat@q4_k_m", "gpt-4o-mini", "team-a/chat"):
        assert resolve(name, [CHAT]) == [CHAT], name
    assert resolve("acme/other", [CHAT]) == []
    # Two models share a key: namespace/name picks one; a key that may see only one gets that one.
    assert resolve("acme/tiny-chat", [CHAT, TWIN]) == [CHAT, TWIN]
    assert resolve("team-b/chat", [CHAT, TWIN]) == [TWIN]
    assert resolve("acme/tiny-chat", [CHAT, TWIN], lambda m: m.namespace == "team-b") == [TWIN]
    assert upstream_model("gpt-4o-mini", CHAT) == "acme/tiny-chat"
    assert upstream_model("acme/tiny-chat@q4_k_m", CHAT) == "acme/tiny-chat@q4_k_m"


def _pod(name: str, ip: str, *, ready: bool = True, deleting: bool = False) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "team-a", "labels": labels("chat"),
                         **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})},
            "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 1234}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_replicas_are_the_ready_pods_the_operator_reports_serving_in_a_rollout() -> None:
    pods = [_pod("old", "10.0.0.1", deleting=True), _pod("a", "10.0.0.2"), _pod("b", "10.0.0.3"),
            _pod("c", "10.0.0.4", ready=False)]
    local_model: dict[str, object] = {"metadata": {"name": "chat", "namespace": "team-a"}, "spec": {},
                                      "status": {"modelKey": "acme/tiny-chat"}}
    # No per-pod status (no operator, or not yet): every ready pod that is not terminating.
    (model,) = served_models([local_model], pods)
    assert [r.name for r in model.replicas] == ["a", "b"] and model.replicas[0].url == "http://10.0.0.2:1234"
    # A rollout's new pod is ready before the operator has loaded the model on it: not yet routed to.
    local_model["status"] = {"modelKey": "acme/tiny-chat", "pods": [{"name": "a", "phase": "Ready"},
                                                                    {"name": "b", "phase": "Loading"}]}
    assert [r.name for r in served_models([local_model], pods)[0].replicas] == ["a"]
    local_model["status"] = {"pods": [{"name": "a", "phase": "Idle"}, {"name": "b", "phase": "Ready"}]}
    assert [r.name for r in served_models([local_model], pods)[0].replicas] == ["a", "b"]
    # Listed serving but terminating, the other one still loading: no replica (a 503 with Retry-After rather
    # than a request the operator's load would cut off).
    local_model["status"] = {"pods": [{"name": "b", "phase": "Loading"}, {"name": "old", "phase": "Ready"}]}
    assert served_models([local_model], pods)[0].replicas == ()


def test_a_pod_whose_gate_is_true_is_ready_before_the_kubelet_says_so() -> None:
    local_model: dict[str, object] = {
        "metadata": {"name": "chat", "namespace": "team-a"}, "spec": {},
        "status": {"modelKey": "acme/tiny-chat", "pods": [{"name": "a", "phase": "Ready"}]}}
    pod = _pod("a", "10.0.0.2", ready=False)
    gate = "lmkube.dev/model-loaded"
    pod["spec"]["readinessGates"] = [{"conditionType": gate}]  # type: ignore[index]
    conditions: list[dict[str, str]] = pod["status"]["conditions"]  # type: ignore[index]
    conditions.append({"type": "ContainersReady", "status": "True"})
    assert served_models([local_model], [pod])[0].replicas == ()  # the gate not written yet
    conditions.append({"type": gate, "status": "False"})
    assert served_models([local_model], [pod])[0].replicas == ()
    conditions[-1]["status"] = "True"  # the operator's write, before the kubelet's next sync of the pod
    assert [r.name for r in served_models([local_model], [pod])[0].replicas] == ["a"]
    conditions[1]["status"] = "False"  # its server stopped answering /health
    assert served_models([local_model], [pod])[0].replicas == ()


def test_grants_and_constant_time_lookup() -> None:
    ring = KeyRing({
        "a": grant_from_fields("a", {"key": "k-a", "namespaces": "team-a"}),
        "b": grant_from_fields("b", {"key": "k-b", "models": "team-b/* gpt-4o-mini", "maxConcurrency": "2"}),
        "none": grant_from_fields("none", {"key": "k-none"}),
    })
    a, b, nothing = ring.lookup("k-a"), ring.lookup("k-b"), ring.lookup("k-none")
    assert a and b and nothing and ring.lookup("k-") is None and ring.lookup("k-ab") is None
    assert a.allows(CHAT) and not a.allows(TWIN)
    assert b.allows(TWIN) and b.allows(CHAT) and b.max_concurrency == 2  # CHAT through its alias
    assert not nothing.allows(CHAT) and not nothing.allows(TWIN)


def test_least_outstanding_then_bounded_prefix_affinity() -> None:
    replicas = [Replica(f"http://10.0.0.{i}:1234", f"pod-{i}") for i in range(3)]
    balancer = Balancer()
    picks = [balancer.pick(replicas) for _ in range(3)]
    for replica in picks:
        assert replica is not None
        balancer.acquire(replica.url)
    assert {r.url for r in picks if r} == {r.url for r in replicas}  # spread by outstanding count
    for replica in picks:
        balancer.release(replica.url)  # type: ignore[union-attr]
    home = balancer.pick(replicas, "conversation 7")
    assert home is not None and all(balancer.pick(replicas, "conversation 7") == home for _ in range(5))
    # The conversation's replica is overloaded (more than 1.25x the mean): the walk moves on, then comes back.
    for _ in range(4):
        balancer.acquire(home.url)
    moved = balancer.pick(replicas, "conversation 7")
    assert moved is not None and moved != home
    for _ in range(4):
        balancer.release(home.url)
    assert balancer.pick(replicas, "conversation 7") == home
    balancer.eject(home.url)  # it failed: avoided until the ejection expires
    assert balancer.pick(replicas, "conversation 7") != home


def test_pods_accept_the_gateway_credential_only_when_the_operator_has_one() -> None:
    spec = parse_spec({"model": "acme/tiny-chat", "gpu": {"count": 0}})
    plain = statefulset("chat", "ns", spec)
    env = {e["name"]: e for e in plain["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LMKUBE_API_TOKENS"]["valueFrom"]["secretKeyRef"]["name"] == "lm-chat-token"
    assert "LMKUBE_GATEWAY_TOKEN" not in env
    # Without a gateway credential the Secret digest is what it was, so upgrading the operator rolls nothing.
    assert reconcile.secret_version("t", OperatorSettings()) == reconcile.fingerprint({"t": "t"})

    settings = replace(OperatorSettings(), gateway_token="gw-secret")
    assert "gw-secret" not in repr(settings)
    rolled = statefulset("chat", "ns", spec, settings)
    env = {e["name"]: e for e in rolled["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LMKUBE_MODEL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lm-chat-token"
    assert env["LMKUBE_GATEWAY_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == gateway_secret_name("chat", "gw-secret")
    assert env["LMKUBE_API_TOKENS"]["value"] == "$(LMKUBE_MODEL_TOKEN),$(LMKUBE_GATEWAY_TOKEN)"
    names = [e["name"] for e in rolled["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert names.index("LMKUBE_API_TOKENS") > names.index("LMKUBE_GATEWAY_TOKEN")  # $(VAR) needs them first
    secret = gateway_secret("chat", "ns", "gw-secret")
    assert secret["stringData"] == {"token": "gw-secret"} and secret["metadata"]["name"].startswith("lm-chat-gw-")
    assert gateway_secret_name("chat", "rotated") != secret["metadata"]["name"]  # a new token, a new Secret
    assert reconcile.secret_version("t", settings) != reconcile.secret_version("t", OperatorSettings())
    assert token_secret("chat", "ns", "t")["metadata"]["name"] != secret["metadata"]["name"]


# -- scale from zero (gateway/wake.py) -------------------------------------------------------------


def test_a_held_stream_continues_with_the_replicas_answer_or_its_error() -> None:
    import asyncio

    from lmkube.gateway.wake import WAITING_COMMENT, HeldStream

    async def scenario(status: int, chunks: list[bytes], path: str) -> list[dict[str, object]]:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        stream = HeldStream(path, send)  # type: ignore[arg-type]
        await stream.start()
        await stream.send({"type": "http.response.start", "status": status, "headers": []})
        for index, chunk in enumerate(chunks):
            await stream.send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})
        return sent

    ok = asyncio.run(scenario(200, [b"data: {}\n\n", b"data: [DONE]\n\n"], "/v1/chat/completions"))
    assert [m["type"] for m in ok] == ["http.response.start", "http.response.body", "http.response.body",
                                       "http.response.body"]
    assert ok[0]["status"] == 200 and ok[1]["body"] == WAITING_COMMENT and ok[-1]["body"] == b"data: [DONE]\n\n"
    # The replica refused the request after the stream had begun: the family's error event, with its message.
    refused = asyncio.run(scenario(400, [b'{"error": {"message": "context too ', b'long", "type": "x"}}'],
                                   "/v1/messages"))
    assert len(refused) == 3 and refused[-1]["more_body"] is False
    assert refused[-1]["body"].startswith(b"event: error\n")  # type: ignore[union-attr]
    assert b"context too long" in refused[-1]["body"]  # type: ignore[operator]


def test_pods_the_operator_has_not_loaded_the_model_on_get_no_requests() -> None:
    from lmkube.gateway.kube import served_models
    from lmkube.operator.resources import labels

    def pod(name: str) -> dict[str, object]:
        return {"metadata": {"name": name, "namespace": "ns", "labels": labels("chat")},
                "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 1234}]}]},
                "status": {"podIP": f"10.0.0.{len(name)}", "conditions": [{"type": "Ready", "status": "True"}]}}

    def model(records: list[dict[str, str]]) -> dict[str, object]:
        return {"metadata": {"namespace": "ns", "name": "chat"}, "spec": {"scaling": {"minReplicas": 0}},
                "status": {"modelKey": "acme/chat", "readyReplicas": 1, "pods": records}}

    pods = [pod("a"), pod("bb"), pod("ccc")]
    # A replica just added by the autoscaler: Ready (its server listens), loading or not yet examined.
    (served,) = served_models([model([{"name": "a", "phase": "Ready"}, {"name": "bb", "phase": "Loading"}])], pods)
    assert [r.name for r in served.replicas] == ["a"]
    assert served.scales_from_zero and served.serving == 1
    (idle,) = served_models([model([{"name": "a", "phase": "Idle"}, {"name": "ccc", "phase": "Ready"}])], pods)
    assert [r.name for r in idle.replicas] == ["a", "ccc"]
    # No pod reported at all (an operator that has not looked yet): every Ready pod, as before.
    (unknown,) = served_models([model([])], pods)
    assert len(unknown.replicas) == 3
