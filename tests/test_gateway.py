"""`lmkube gateway` in front of real `lmkube serve` replicas (tiny generated models, real llama.cpp), reached
with the official OpenAI and Anthropic SDKs and httpx: routing by model, keys, model lists, prefix affinity,
`previous_response_id` across gateway replicas, a replica killed mid-stream, per-key limits, disconnects.

The replicas come from a backends file (static discovery); tests/test_gateway_kube.py covers discovery from
the Kubernetes API.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from gateway_support import GatewayProcess, start_gateway, write_yaml
from prometheus_client.parser import text_string_to_metric_families
from support import LMKUBE, ServerProcess, wait_until

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

UPSTREAM = secrets.token_hex(16)  # the credential the replicas accept from the gateway
ALL_KEY, TEAM_A_KEY, ONE_AT_A_TIME_KEY = (f"gw-{secrets.token_hex(12)}" for _ in range(3))
USER = [{"role": "user", "content": "Hello there"}]
# acme/long-chat's whole trained context: a generation nobody stops runs far longer than any test waits.
LONG = ("--ctx-size", "65536")


@pytest.fixture(scope="module")
def gateway_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("gateway-models")
    write_llama_model(models / "acme" / "tiny-chat" / "tiny-chat-F16.gguf", seed=1, name="Tiny Chat")
    write_llama_model(models / "acme" / "other-chat" / "other-chat-F16.gguf", seed=2, name="Other Chat")
    # A long context: a generation nobody stops runs far longer than any test waits.
    write_llama_model(models / "acme" / "long-chat" / "long-chat-F16.gguf", seed=1,
                      shape=LlamaShape(n_ctx_train=65536))
    return models


@pytest.fixture(scope="module")
def replicas(start_server: Any, gateway_models: Path) -> list[ServerProcess]:
    """s0, s1: the replicas of team-a/chat, team-a/long and team-b/other; s2, s3: team-c/victim (one slot
    each and no queue, so a held slot shows), killed by the failure tests."""
    wide = [start_server(gateway_models, "--parallel", "4", *LONG, "--no-auto-evict", "--api-token", UPSTREAM,
                         token=UPSTREAM)
            for _ in range(2)]
    narrow = [start_server(gateway_models, "--parallel", "1", *LONG, "--max-queue", "0", "--api-token", UPSTREAM,
                           token=UPSTREAM) for _ in range(2)]
    return wide + narrow


def backends(replicas: list[ServerProcess], victims: list[ServerProcess]) -> dict[str, Any]:
    wide = [s.base_url for s in replicas[:2]]
    return {"models": [
        {"namespace": "team-a", "name": "chat", "modelKey": "acme/tiny-chat", "aliases": ["tiny"], "replicas": wide},
        {"namespace": "team-a", "name": "long", "modelKey": "acme/long-chat", "replicas": wide},
        {"namespace": "team-b", "name": "other", "modelKey": "acme/other-chat", "replicas": wide},
        {"namespace": "team-b", "name": "stopped", "modelKey": "acme/stopped-chat", "replicas": []},
        {"namespace": "team-c", "name": "victim", "modelKey": "acme/long-chat",
         "replicas": [s.base_url for s in victims]},
    ]}


@pytest.fixture(scope="module")
def gateway_files(tmp_path_factory: pytest.TempPathFactory, replicas: list[ServerProcess]) -> dict[str, Path]:
    workdir = tmp_path_factory.mktemp("gateway")
    keys = {"keys": [
        {"name": "everything", "key": ALL_KEY, "namespaces": "*"},
        {"name": "team-a", "key": TEAM_A_KEY, "namespaces": ["team-a"]},
        {"name": "one-at-a-time", "key": ONE_AT_A_TIME_KEY, "models": ["team-a/*"], "maxConcurrency": 1},
    ]}
    (workdir / "upstream-token").write_text(UPSTREAM)
    return {"dir": workdir, "backends": write_yaml(workdir / "backends.yaml", backends(replicas, replicas[2:])),
            "keys": write_yaml(workdir / "keys.yaml", keys), "token": workdir / "upstream-token"}


def _start(files: dict[str, Path]) -> GatewayProcess:
    return start_gateway(files["dir"], "--backends", str(files["backends"]), "--keys-file", str(files["keys"]),
                         "--upstream-token-file", str(files["token"]))


@pytest.fixture(scope="module")
def gateways(gateway_files: dict[str, Path]) -> Iterator[list[GatewayProcess]]:
    """Two gateway replicas over the same replicas (as the chart's Deployment runs two)."""
    started = [_start(gateway_files) for _ in range(2)]
    yield started
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def gw(gateways: list[GatewayProcess]) -> GatewayProcess:
    return gateways[0]


def oai(gw: GatewayProcess, key: str = ALL_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=60)


def claude(gw: GatewayProcess, key: str = ALL_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0, timeout=60)


def post(gw: GatewayProcess, path: str, body: dict[str, Any], key: str = ALL_KEY, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{gw.base_url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      **kwargs)


def busy(server: ServerProcess) -> list[dict[str, Any]]:
    instances = httpx.get(f"{server.base_url}/api/v1/instances", headers=server.headers, timeout=10).json()
    return [i for i in instances["instances"] if i["active"] or i["queued"]]


def by_url(replicas: list[ServerProcess], url: str) -> ServerProcess:
    return next(s for s in replicas if s.base_url == url)


# -- the three API families through one endpoint ---------------------------------------------------------


def test_openai_chat_streaming_and_completions(gw: GatewayProcess) -> None:
    client = oai(gw)
    answer = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6)
    assert answer.model == "acme/tiny-chat"  # the alias was rewritten to the pod's key
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="team-b/other", messages=USER, max_tokens=6, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    completion = client.completions.create(model="acme/other-chat", prompt="Once upon", max_tokens=4)
    assert completion.choices[0].text is not None


def test_anthropic_messages_stream_and_count_tokens(gw: GatewayProcess) -> None:
    client = claude(gw)
    message = client.messages.create(model="tiny", max_tokens=6, messages=USER)
    assert message.type == "message" and message.usage.output_tokens > 0
    with client.messages.stream(model="other", max_tokens=6, messages=USER) as stream:
        events = [event.type for event in stream]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert client.messages.count_tokens(model="tiny", messages=USER).input_tokens > 0


def test_lm_studio_native_chat_and_lists(gw: GatewayProcess) -> None:
    first = post(gw, "/api/v1/chat", {"model": "tiny", "input": "Hello", "max_output_tokens": 4})
    assert first.status_code == 200, first.text
    second = post(gw, "/api/v1/chat", {"model": "tiny", "input": "Again", "max_output_tokens": 4,
                                       "previous_response_id": first.json()["response_id"]})
    assert second.status_code == 200, second.text
    headers = {"Authorization": f"Bearer {ALL_KEY}"}
    native = httpx.get(f"{gw.base_url}/api/v1/models", headers=headers, timeout=30).json()["models"]
    keys = {m["key"]: m for m in native}
    # A key two LocalModels share is listed as namespace/name; a model with no replica is listed too.
    assert set(keys) == {"acme/tiny-chat", "acme/other-chat", "acme/stopped-chat", "team-a/long", "team-c/victim"}
    assert keys["acme/tiny-chat"]["max_context_length"] == 2048  # the entry a replica lists, whole
    assert keys["acme/stopped-chat"]["loaded_instances"] == []
    legacy = httpx.get(f"{gw.base_url}/api/v0/models", headers=headers, timeout=30).json()["data"]
    assert {m["id"] for m in legacy} == set(keys)
    one = httpx.get(f"{gw.base_url}/api/v0/models/tiny", headers=headers, timeout=30)
    assert one.status_code == 200 and one.json()["id"] == "acme/tiny-chat" and one.json()["type"] == "llm"


def test_lmkube_ls_lists_the_cluster_models(gw: GatewayProcess) -> None:
    env = {**os.environ, "LMKUBE_BASE_URL": gw.base_url, "LMKUBE_API_TOKEN": ALL_KEY, "NO_COLOR": "1"}
    listed = subprocess.run([LMKUBE, "ls"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    for key in ("acme/tiny-chat", "acme/other-chat", "acme/stopped-chat", "team-c/victim"):
        assert key in listed.stdout
    only_a = subprocess.run([LMKUBE, "ls"], env={**env, "LMKUBE_API_TOKEN": TEAM_A_KEY}, capture_output=True,
                            text=True, timeout=60, check=False)
    assert "acme/tiny-chat" in only_a.stdout and "acme/other-chat" not in only_a.stdout


def test_model_lists_are_what_the_key_may_use(gw: GatewayProcess) -> None:
    everything = sorted(m.id for m in oai(gw).models.list())
    assert everything == ["acme/other-chat", "acme/stopped-chat", "acme/tiny-chat", "team-a/long", "team-c/victim"]
    team_a = oai(gw, TEAM_A_KEY)
    # Alone among team-a's models, acme/long-chat is listed under its key again.
    assert sorted(m.id for m in team_a.models.list()) == ["acme/long-chat", "acme/tiny-chat"]
    assert team_a.models.retrieve("tiny").id == "acme/tiny-chat"
    with pytest.raises(openai.NotFoundError):
        team_a.models.retrieve("acme/other-chat")  # exists, but this key may not see it


def test_responses_chain_across_gateway_replicas(gateways: list[GatewayProcess]) -> None:
    """A conversation lives on the replica that answered its first turn; either gateway replica finds it."""
    first_gw, second_gw = (oai(g) for g in gateways)
    raw = first_gw.responses.with_raw_response.create(model="tiny", input="Hello", max_output_tokens=4)
    turn, owner = raw.parse(), raw.headers["x-lmkube-replica"]
    for index, client in enumerate([second_gw, first_gw, second_gw]):
        raw = client.responses.with_raw_response.create(model="tiny", input=f"More {index}", max_output_tokens=4,
                                                        previous_response_id=turn.id)
        previous, turn = turn, raw.parse()
        assert raw.headers["x-lmkube-replica"] == owner
        assert turn.previous_response_id == previous.id and turn.usage is not None
        assert turn.usage.input_tokens > previous.usage.input_tokens  # type: ignore[union-attr]  # history came along
    with first_gw.responses.stream(model="tiny", input="Streamed", max_output_tokens=4,
                                   previous_response_id=turn.id) as stream:
        final = [event.response for event in stream if event.type in ("response.completed", "response.incomplete")]
    assert final and final[0].previous_response_id == turn.id


def test_a_restarted_gateway_replica_continues_conversations(gateways: list[GatewayProcess],
                                                             gateway_files: dict[str, Path]) -> None:
    """A gateway replica keeps nothing a conversation needs: a new one finds where it lives."""
    first = oai(gateways[0]).responses.with_raw_response.create(model="tiny", input="Hi", max_output_tokens=4)
    gateways[1].stop()
    gateways[1] = _start(gateway_files)
    for _ in range(2):  # by prefix affinity or by trying the replicas: always the one that holds it
        raw = oai(gateways[1]).responses.with_raw_response.create(
            model="tiny", input="Go on", max_output_tokens=4, previous_response_id=first.parse().id)
        assert raw.headers["x-lmkube-replica"] == first.headers["x-lmkube-replica"]


def test_stored_responses_are_found_whichever_gateway_replica_is_asked(gateways: list[GatewayProcess]) -> None:
    """GET, input_items and DELETE name no model: the gateway asks the replica that stored the response (or,
    not having seen it, each replica the key may use)."""
    first_gw, second_gw = (oai(g) for g in gateways)
    created = first_gw.responses.create(model="tiny", input="Remember me", max_output_tokens=4)
    for client in (first_gw, second_gw):  # second_gw never saw the answer
        found = client.responses.retrieve(created.id)
        assert found.id == created.id and found.output_text == created.output_text
        items = client.responses.input_items.list(created.id)
        assert [item.type for item in items.data] == ["message"]
    assert second_gw.responses.delete(created.id) is None
    for client in (first_gw, second_gw):
        with pytest.raises(openai.NotFoundError) as missing:
            client.responses.retrieve(created.id)
        assert missing.value.body["message"] == f"Response with id '{created.id}' not found."  # type: ignore[index]
    anonymous = httpx.get(f"{gateways[0].base_url}/v1/responses/{created.id}", timeout=10)
    assert anonymous.status_code == 401


# -- errors in each family's shape -----------------------------------------------------------------------


def test_unknown_model_is_404_in_each_family(gw: GatewayProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai(gw).chat.completions.create(model="acme/nope", messages=USER, max_tokens=1)
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude(gw).messages.create(model="acme/nope", max_tokens=1, messages=USER)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    native = post(gw, "/api/v1/chat", {"model": "acme/nope", "input": "Hi"})
    assert native.status_code == 404 and native.json()["error"]["type"] == "model_not_found"
    ambiguous = post(gw, "/v1/chat/completions", {"model": "acme/long-chat", "messages": USER})
    assert ambiguous.status_code == 400 and "team-a/long" in ambiguous.json()["error"]["message"]


def test_keys_401_and_403_in_each_family(gw: GatewayProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        oai(gw, "gw-wrong").chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        claude(gw, "gw-wrong").messages.create(model="tiny", max_tokens=1, messages=USER)
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert httpx.get(f"{gw.base_url}/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.PermissionDeniedError):
        oai(gw, TEAM_A_KEY).chat.completions.create(model="other", messages=USER, max_tokens=1)
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        claude(gw, TEAM_A_KEY).messages.create(model="other", max_tokens=1, messages=USER)
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    # The pods' own credential is not a gateway key.
    assert post(gw, "/v1/chat/completions", {"model": "tiny", "messages": USER}, key=UPSTREAM).status_code == 401


def test_model_without_replicas_is_503_with_retry_after(gw: GatewayProcess) -> None:
    answer = post(gw, "/v1/chat/completions", {"model": "acme/stopped-chat", "messages": USER})
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert answer.json()["error"]["code"] == "model_not_running"
    overloaded = post(gw, "/v1/messages", {"model": "acme/stopped-chat", "max_tokens": 1, "messages": USER})
    assert overloaded.status_code == 529 and overloaded.json()["error"]["type"] == "overloaded_error"


# -- balancing ---------------------------------------------------------------------------------------------


def test_prefix_affinity_returns_each_conversation_to_its_replica(gw: GatewayProcess) -> None:
    seen = set()
    for index in range(12):
        messages = [{"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": f"Conversation {index}: what is {index} squared?"}]
        first = post(gw, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 4})
        reply = first.json()["choices"][0]["message"]["content"]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And cubed?"}]
        second = post(gw, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 4})
        assert second.headers["x-lmkube-replica"] == first.headers["x-lmkube-replica"]
        seen.add(first.headers["x-lmkube-replica"])
    assert len(seen) == 2  # different conversations spread over both replicas


def test_concurrency_limit_is_429_and_a_disconnect_frees_the_slot(
        gw: GatewayProcess, replicas: list[ServerProcess]) -> None:
    body = {"model": "team-a/long", "messages": USER, "max_tokens": 60000,
            "stream": True}
    headers = {"Authorization": f"Bearer {ONE_AT_A_TIME_KEY}"}
    with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as held:
        lines = held.iter_lines()  # kept: dropping a finished iter_lines() closes the response
        next(line for line in lines if line.startswith("data: "))
        replica = by_url(replicas, held.headers["x-lmkube-replica"])
        assert busy(replica)
        refused = post(gw, "/v1/chat/completions", {"model": "tiny", "messages": USER}, key=ONE_AT_A_TIME_KEY)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        limited = post(gw, "/v1/messages", {"model": "tiny", "max_tokens": 1, "messages": USER}, key=ONE_AT_A_TIME_KEY)
        assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    # The client went away: the replica's slot is free long before the 60000 tokens, and so is the key's.
    wait_until(lambda: not busy(replica), timeout=20, message="the replica still generates for a gone client")
    wait_until(lambda: post(gw, "/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 1},
                            key=ONE_AT_A_TIME_KEY).status_code == 200, timeout=20)


def test_disconnect_closes_the_upstream_request(gw: GatewayProcess, replicas: list[ServerProcess]) -> None:
    """On a replica with one slot and no queue, the slot a gone client held takes the next request at once."""
    body = {"model": "team-c/victim", "max_tokens": 60000, "messages": USER, "stream": True}
    with httpx.stream("POST", f"{gw.base_url}/v1/messages", json=body,
                      headers={"x-api-key": ALL_KEY}, timeout=60) as held:
        lines = held.iter_lines()
        next(line for line in lines if "content_block_delta" in line)
        replica = by_url(replicas, held.headers["x-lmkube-replica"])
        direct = httpx.post(f"{replica.base_url}/v1/chat/completions", headers=replica.headers, timeout=30,
                            json={"model": "acme/long-chat", "messages": USER, "max_tokens": 1})
        assert direct.status_code == 503  # its only slot is held through the gateway
    wait_until(lambda: not busy(replica), timeout=20, message="the replica still generates for a gone client")
    direct = httpx.post(f"{replica.base_url}/v1/chat/completions", headers=replica.headers, timeout=30,
                        json={"model": "acme/long-chat", "messages": USER, "max_tokens": 1})
    assert direct.status_code == 200
    # A non-streamed answer comes whole at the end: a client that gives up before then cancels it too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {ALL_KEY}"},
                   timeout=httpx.Timeout(30, read=1),
                   json={"model": "team-c/victim", "messages": USER, "max_tokens": 60000})
    wait_until(lambda: not any(busy(s) for s in replicas[2:]), timeout=20,
               message="the replica still generates a whole answer for a gone client")


# -- failures ----------------------------------------------------------------------------------------------


def test_replica_killed_mid_stream_ends_with_the_error_event(
        gw: GatewayProcess, replicas: list[ServerProcess], gateway_files: dict[str, Path], start_server: Any,
        gateway_models: Path) -> None:
    body = {"model": "team-c/victim", "messages": USER, "max_tokens": 60000, "stream": True}
    began = time.monotonic()
    with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {ALL_KEY}"}, timeout=30) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        victim = by_url(replicas, response.headers["x-lmkube-replica"])
        victim.process.send_signal(signal.SIGKILL)
        rest = [line for line in lines if line]
    assert time.monotonic() - began < 30
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "stopped answering" in error["message"]
    # New requests avoid the dead replica at once.
    survivor = next(s for s in replicas[2:] if s is not victim)
    for _ in range(3):
        answer = post(gw, "/v1/chat/completions", {"model": "team-c/victim", "messages": USER, "max_tokens": 2})
        assert answer.status_code == 200 and answer.headers["x-lmkube-replica"] == survivor.base_url

    # A new replica written into the backends file is followed; the Anthropic SDK sees its death as an error.
    fresh = start_server(gateway_models, "--parallel", "1", *LONG, "--max-queue", "0", "--api-token", UPSTREAM,
                         token=UPSTREAM)
    write_yaml(gateway_files["backends"], backends(replicas, [survivor, fresh]))

    def lands_on_fresh() -> bool:  # a new conversation each time: the same one would stick to its replica
        messages = [{"role": "user", "content": f"Hello {secrets.token_hex(4)}"}]
        answer = post(gw, "/v1/chat/completions", {"model": "team-c/victim", "messages": messages, "max_tokens": 1})
        return answer.headers.get("x-lmkube-replica") == fresh.base_url
    wait_until(lands_on_fresh, timeout=20, message="the gateway never used the replica added to its file")
    client = claude(gw)
    with pytest.raises(anthropic.APIStatusError) as caught, client.messages.with_streaming_response.create(
            model="team-c/victim", max_tokens=60000, messages=USER, stream=True) as raw:
        replica = {s.base_url: s for s in (survivor, fresh)}[raw.headers["x-lmkube-replica"]]
        for event in raw.parse():
            if event.type == "content_block_delta":
                replica.process.send_signal(signal.SIGKILL)
    assert "stopped answering" in str(caught.value)

    health = httpx.get(f"{gw.base_url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    metrics = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(httpx.get(f"{gw.base_url}/metrics", timeout=10).text)
               for sample in family.samples}
    died = ("lmkube_gateway_upstream_errors_total", (("key", "everything"), ("model", "team-c/victim"),
                                                     ("reason", "died")))
    assert metrics[died] == 2
    assert metrics[("lmkube_gateway_requests_total", (("code", "200"), ("key", "everything"),
                                                      ("model", "team-a/chat")))] >= 1
    assert metrics[("lmkube_gateway_ready_replicas", (("model", "team-c/victim"),))] == 2
