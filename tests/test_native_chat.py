"""LM Studio's native `POST /api/v1/chat` on real servers: response shape, named SSE events, reasoning
items, stateful chats (continuation, branching, persistence across a restart) and errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import CHAT_MODEL, EMBED_MODEL, LMKUBE, ServerProcess

from lmkube.synthetic_gguf import write_bert_embedding_model, write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
REASONING_MODEL = "acme/r1-think"
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{48}")
STATS = {"input_tokens", "total_output_tokens", "reasoning_output_tokens", "tokens_per_second",
         "time_to_first_token_seconds"}


@pytest.fixture(scope="module")
def native_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("native-models")
    write_llama_model(models / "acme" / "tiny-chat" / "tiny-chat-F16.gguf", seed=1, name="Tiny Chat")
    r1_template = (TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text()
    write_llama_model(models / "acme" / "r1-think" / "r1-think-F16.gguf", seed=6, chat_template=r1_template,
                      extra_special_tokens=("<think>", "</think>"))
    write_bert_embedding_model(models / "acme" / "tiny-embed" / "tiny-embed-F32.gguf", name="Tiny Embed")
    return models


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("native-home")


@pytest.fixture(scope="module")
def native_server(start_server, native_models: Path, home: Path) -> ServerProcess:
    # No auto-evict: the tests switch between the two chat models.
    return start_server(native_models, "--no-auto-evict", env={"LMKUBE_HOME": str(home)})


@pytest.fixture(scope="module")
def http(native_server: ServerProcess) -> httpx.Client:
    with native_server.client() as client:
        yield client


def chat(client: httpx.Client, **body: Any) -> dict[str, Any]:
    body = {"model": CHAT_MODEL, "temperature": 0, "max_output_tokens": 6, **body}
    response = client.post("/api/v1/chat", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client: httpx.Client, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    body = {"model": CHAT_MODEL, "temperature": 0, "max_output_tokens": 6, **body, "stream": True}
    events = []
    with client.stream("POST", "/api/v1/chat", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert text.endswith("\n\n")
    for frame in text.strip("\n").split("\n\n"):
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        name, data = name_line[len("event: "):], json.loads(data_line[len("data: "):])
        assert data["type"] == name  # every data object repeats its event name
        events.append((name, data))
    return events


def message_text(result: dict[str, Any]) -> str:
    return "".join(item["content"] for item in result["output"] if item["type"] == "message")


def completion_prompt_tokens(client: httpx.Client, messages: list[dict[str, Any]]) -> int:
    """How many prompt tokens the same conversation takes through /v1/chat/completions."""
    response = client.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": messages,
                                                          "max_tokens": 1, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def assert_native_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["type"] in {"invalid_request", "unknown", "not_implemented", "model_not_found", "internal_error"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error.get("code") == code
    return error


def loaded_instances(client: httpx.Client, key: str) -> list[dict[str, Any]]:
    models = client.get("/api/v1/models").json()["models"]
    return next(m for m in models if m["key"] == key)["loaded_instances"]


# -- shape -----------------------------------------------------------------------------------------


def test_non_streaming_response_shape(http: httpx.Client) -> None:
    result = chat(http, input="Hello there", system_prompt="Be brief.", top_p=0.9, top_k=20, min_p=0.1,
                  repeat_penalty=1.1)
    assert set(result) == {"model_instance_id", "output", "stats", "response_id"}
    assert result["model_instance_id"] == CHAT_MODEL
    assert RESPONSE_ID.fullmatch(result["response_id"])
    assert len(result["output"]) == 1
    item = result["output"][0]
    assert set(item) == {"type", "content"} and item["type"] == "message"
    assert isinstance(item["content"], str) and item["content"]
    stats = result["stats"]
    assert STATS <= set(stats) <= STATS | {"model_load_time_seconds"}
    assert stats["total_output_tokens"] == 6  # the random model never samples EOS
    assert stats["reasoning_output_tokens"] == 0
    assert stats["tokens_per_second"] > 0 and stats["time_to_first_token_seconds"] > 0
    expected = completion_prompt_tokens(http, [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hello there"}])
    assert stats["input_tokens"] == expected
    # The model is loaded now: no load time on the next request.
    assert "model_load_time_seconds" not in chat(http, input="Hi", store=False)["stats"]


def test_text_items_and_message_items_are_the_same_input(http: httpx.Client) -> None:
    plain = chat(http, input="Hello there", store=False)
    text = chat(http, input=[{"type": "text", "content": "Hello there"}], store=False)
    message = chat(http, input=[{"type": "message", "content": "Hello there"}], store=False)
    assert plain["output"] == text["output"] == message["output"]
    assert plain["stats"]["input_tokens"] == text["stats"]["input_tokens"] == message["stats"]["input_tokens"]


def test_streaming_events_and_result_match_non_streaming(http: httpx.Client) -> None:
    events = stream(http, input="Tell me a story", store=False, max_output_tokens=10)
    names = [name for name, _ in events]
    assert names[0] == "chat.start" and names[-1] == "chat.end"
    assert names.count("chat.start") == names.count("chat.end") == 1
    assert events[0][1] == {"type": "chat.start", "model_instance_id": CHAT_MODEL}
    assert "error" not in names and not any(n.startswith("model_load.") for n in names)  # already loaded
    assert names.index("prompt_processing.start") < names.index("prompt_processing.end") < names.index(
        "message.start")
    middle = names[names.index("message.start"):names.index("message.end") + 1]
    assert middle[0] == "message.start" and middle[-1] == "message.end"
    assert set(middle[1:-1]) == {"message.delta"}
    assert names[names.index("message.end") + 1:] == ["chat.end"]
    result = events[-1][1]["result"]
    assert "response_id" not in result
    streamed = "".join(data["content"] for name, data in events if name == "message.delta")
    assert streamed == message_text(result) and streamed
    plain = chat(http, input="Tell me a story", store=False, max_output_tokens=10)
    assert result["output"] == plain["output"]
    assert result["model_instance_id"] == plain["model_instance_id"]
    assert {k: result["stats"][k] for k in ("input_tokens", "total_output_tokens", "reasoning_output_tokens")} == {
        k: plain["stats"][k] for k in ("input_tokens", "total_output_tokens", "reasoning_output_tokens")}


def test_streamed_jit_load_reports_load_events_and_applies_context_length(http: httpx.Client) -> None:
    for instance in loaded_instances(http, CHAT_MODEL):
        assert http.post("/api/v1/models/unload", json={"instance_id": instance["id"]}).status_code == 200
    events = stream(http, input="Hi", store=False, context_length=512)
    names = [name for name, _ in events]
    assert names[:2] == ["chat.start", "model_load.start"]
    assert names.index("model_load.end") < names.index("prompt_processing.start")
    load_end = dict(events)["model_load.end"]
    assert load_end["model_instance_id"] == CHAT_MODEL and load_end["load_time_seconds"] >= 0
    result = events[-1][1]["result"]
    assert result["stats"]["model_load_time_seconds"] == load_end["load_time_seconds"]
    assert [i["config"]["context_length"] for i in loaded_instances(http, CHAT_MODEL)] == [512]
    # Loaded now: context_length no longer applies and nothing is loaded again.
    again = stream(http, input="Hi", store=False, context_length=1024)
    assert not any(name.startswith("model_load.") for name, _ in again)
    assert [i["config"]["context_length"] for i in loaded_instances(http, CHAT_MODEL)] == [512]


# -- reasoning -------------------------------------------------------------------------------------


def test_reasoning_items_for_a_template_that_opens_a_think_block(http: httpx.Client) -> None:
    result = chat(http, model=REASONING_MODEL, input="What's the weather?", max_output_tokens=12)
    assert [item["type"] for item in result["output"]] == ["reasoning"]  # the think block never closed
    assert result["output"][0]["content"]
    assert 0 < result["stats"]["reasoning_output_tokens"] <= result["stats"]["total_output_tokens"] == 12
    events = stream(http, model=REASONING_MODEL, input="What's the weather?", max_output_tokens=12)
    names = [name for name, _ in events]
    assert names[0] == "chat.start" and names[-1] == "chat.end"
    assert names.index("reasoning.start") < names.index("reasoning.delta") < names.index("reasoning.end")
    assert "message.start" not in names
    streamed = "".join(data["content"] for name, data in events if name == "reasoning.delta")
    assert streamed == result["output"][0]["content"]
    assert events[-1][1]["result"]["output"] == result["output"]


def test_reasoning_off_reaches_the_template(http: httpx.Client) -> None:
    result = chat(http, model=REASONING_MODEL, input="What's the weather?", max_output_tokens=8, reasoning="off")
    assert [item["type"] for item in result["output"]] == ["message"]
    assert result["stats"]["reasoning_output_tokens"] == 0


# -- stateful chats --------------------------------------------------------------------------------


def test_store_false_gives_no_response_id(http: httpx.Client, home: Path) -> None:
    before = set((home / "conversations").glob("*.json")) if (home / "conversations").exists() else set()
    result = chat(http, input="Forget me", store=False)
    assert "response_id" not in result
    after = set((home / "conversations").glob("*.json")) if (home / "conversations").exists() else set()
    assert after == before


def test_previous_response_id_continues_the_conversation(http: httpx.Client, home: Path) -> None:
    first = chat(http, input="My name is Zed.", system_prompt="You are terse.")
    second = chat(http, input="What is my name?", previous_response_id=first["response_id"])
    assert RESPONSE_ID.fullmatch(second["response_id"]) and second["response_id"] != first["response_id"]
    assert second["stats"]["input_tokens"] > first["stats"]["input_tokens"]
    # The earlier turn (system prompt, input and reply) is exactly what the model saw before the new input.
    assert second["stats"]["input_tokens"] == completion_prompt_tokens(http, [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "My name is Zed."},
        {"role": "assistant", "content": message_text(first)},
        {"role": "user", "content": "What is my name?"},
    ])
    stored = json.loads((home / "conversations" / f"{second['response_id']}.json").read_text())
    assert stored["parent_id"] == first["response_id"] and stored["model"] == CHAT_MODEL
    assert stored["messages"] == [{"role": "user", "content": "What is my name?"},
                                  {"role": "assistant", "content": message_text(second)}]
    # Streaming continues a stored conversation too, and stores its own turn.
    events = stream(http, input="And again?", previous_response_id=second["response_id"])
    result = events[-1][1]["result"]
    assert RESPONSE_ID.fullmatch(result["response_id"])
    assert result["stats"]["input_tokens"] > second["stats"]["input_tokens"]


def test_conversations_branch(http: httpx.Client) -> None:
    root = chat(http, input="Start here.")
    left = chat(http, input="Go left.", previous_response_id=root["response_id"])
    right = chat(http, input="Go right, a much longer way round.", previous_response_id=root["response_id"])
    assert left["response_id"] != right["response_id"]
    left2 = chat(http, input="Continue.", previous_response_id=left["response_id"])
    right2 = chat(http, input="Continue.", previous_response_id=right["response_id"])
    start = [{"role": "user", "content": "Start here."}, {"role": "assistant", "content": message_text(root)}]
    assert left2["stats"]["input_tokens"] == completion_prompt_tokens(http, [
        *start, {"role": "user", "content": "Go left."}, {"role": "assistant", "content": message_text(left)},
        {"role": "user", "content": "Continue."}])
    assert right2["stats"]["input_tokens"] == completion_prompt_tokens(http, [
        *start, {"role": "user", "content": "Go right, a much longer way round."},
        {"role": "assistant", "content": message_text(right)}, {"role": "user", "content": "Continue."}])
    assert right2["stats"]["input_tokens"] > left2["stats"]["input_tokens"]


def test_stored_responses_survive_a_restart(start_server, native_models: Path,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("restart-home")
    server = start_server(native_models, env={"LMKUBE_HOME": str(home)})
    with server.client() as client:
        first = chat(client, input="Remember this.")
        expected = completion_prompt_tokens(client, [
            {"role": "user", "content": "Remember this."}, {"role": "assistant", "content": message_text(first)},
            {"role": "user", "content": "Still there?"}])
    server.stop()
    assert (home / "conversations" / f"{first['response_id']}.json").is_file()
    restarted = start_server(native_models, env={"LMKUBE_HOME": str(home)})
    with restarted.client() as client:
        second = chat(client, input="Still there?", previous_response_id=first["response_id"])
    assert second["stats"]["input_tokens"] == expected
    restarted.stop()


def test_unknown_previous_response_id_is_a_native_404(http: httpx.Client) -> None:
    response = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "Hi",
                                               "previous_response_id": "resp_" + "0" * 48})
    error = assert_native_error(response, 404, "previous_response_not_found")
    assert error["type"] == "invalid_request" and error["param"] == "previous_response_id"
    assert "resp_" + "0" * 48 in error["message"]
    streamed = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "Hi", "stream": True,
                                               "previous_response_id": "resp_../../etc"})
    assert_native_error(streamed, 404, "previous_response_not_found")
    malformed = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "Hi", "previous_response_id": "abc"})
    assert_native_error(malformed, 400)


# -- errors ----------------------------------------------------------------------------------------


def test_errors_before_generation_starts_are_http_errors_when_streaming_too(http: httpx.Client) -> None:
    # A streamed chat starts its response only once its generation is submitted, so what refuses the
    # request (here a prompt past the context; a full queue alike) is an HTTP error as on every other route.
    long_input = "lorem ipsum " * 3000  # past the tiny model's context
    for streamed in (False, True):
        response = http.post("/api/v1/chat", json={"model": REASONING_MODEL, "input": long_input, "stream": streamed})
        error = assert_native_error(response, 400, "context_length_exceeded")
        assert error["param"] == "input"


def test_image_input_is_rejected_for_a_model_without_vision(http: httpx.Client) -> None:
    response = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": [
        {"type": "text", "content": "What is this?"},
        {"type": "image", "data_url": "data:image/png;base64,iVBORw0KGgo="}]})
    error = assert_native_error(response, 400, "model_not_vision_capable")
    assert error["param"] == "input" and "image" in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "Hi"}, "model"),
    ({"model": CHAT_MODEL}, "input"),
    ({"model": CHAT_MODEL, "input": 5}, "input"),
    ({"model": CHAT_MODEL, "input": []}, "input"),
    ({"model": CHAT_MODEL, "input": [{"type": "video", "content": "x"}]}, "input"),
    ({"model": CHAT_MODEL, "input": [{"type": "text"}]}, "input"),
    ({"model": CHAT_MODEL, "input": "Hi", "reasoning": "max"}, "reasoning"),
    ({"model": CHAT_MODEL, "input": "Hi", "temperature": -1}, "temperature"),
    ({"model": CHAT_MODEL, "input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": CHAT_MODEL, "input": "Hi", "store": "maybe"}, "store"),
])
def test_bad_bodies_are_native_400s(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    error = assert_native_error(http.post("/api/v1/chat", json=body), 400)
    assert error["type"] == "invalid_request" and error.get("param") == param


def test_bad_json_is_a_400(http: httpx.Client) -> None:
    response = http.post("/api/v1/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert_native_error(response, 400)


def test_integrations_need_permission(http: httpx.Client) -> None:
    response = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "Hi", "integrations": ["mcp/playwright"]})
    error = assert_native_error(response, 403, "mcp_json_requires_auth")
    assert "--api-token" in error["message"] and error["param"] == "integrations"
    response = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "Hi", "integrations": [
        {"type": "ephemeral_mcp", "server_label": "x", "server_url": "http://127.0.0.1:9/mcp"}]})
    assert "--allow-remote-mcp" in assert_native_error(response, 403, "remote_mcp_disabled")["message"]
    assert chat(http, input="Hi", integrations=[], store=False)["output"]  # an empty list asks for nothing


def test_unknown_and_embedding_models(http: httpx.Client) -> None:
    error = assert_native_error(http.post("/api/v1/chat", json={"model": "acme/nope", "input": "Hi"}), 404)
    assert error["type"] == "model_not_found"
    error = assert_native_error(http.post("/api/v1/chat", json={"model": EMBED_MODEL, "input": "Hi"}), 400)
    assert error["param"] == "model"


def test_a_token_server_requires_the_token(start_server, native_models: Path) -> None:
    token = subprocess.run([LMKUBE, "token", "new"], capture_output=True, text=True, check=True).stdout.strip()
    server = start_server(native_models, "--api-token", token, token=token)
    body = {"model": CHAT_MODEL, "input": "Hi", "max_output_tokens": 2}
    unauthenticated = httpx.post(f"{server.base_url}/api/v1/chat", json=body, timeout=60)
    assert_native_error(unauthenticated, 401)
    assert httpx.post(f"{server.base_url}/api/v1/chat", json={"model": 5}, timeout=60).status_code == 401
    with server.client() as client:
        assert "response_id" in chat(client, **body)
    server.stop()
