"""LM Studio's legacy REST API v0 (/api/v0/*) against real `lmkube serve` processes: the model objects
(type/arch/state/capabilities), the stats/model_info/runtime blocks on completions, streaming, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import BYTES_MODEL, CHAT_MODEL, EMBED_MODEL, OTHER_CHAT_MODEL, ServerProcess, write_test_models

from lmkube.synthetic_gguf import CHATML_TEMPLATE, write_llama_model

ServerFactory = Callable[..., ServerProcess]

TOOL_MODEL = "acme/tool-chat"
VISION_MODEL = "acme/vision-chat"
MESSAGES = [{"role": "user", "content": "Say something."}]
MODEL_KEYS = ["id", "object", "type", "publisher", "arch", "compatibility_type", "quantization", "state",
              "max_context_length"]
STOP_REASONS = {"userStopped", "modelUnloaded", "failed", "eosFound", "stopStringFound", "toolCalls",
                "maxPredictedTokensReached", "contextLengthReached"}
EOS_TOKEN = 2  # </s> in the generated llama models' vocabulary
TOKEN = "sk-lm-Legacy01:abcdefghijABCDEFGHIJ"


@pytest.fixture(scope="module")
def v0_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The standard test models plus one whose template knows tools and one with a vision projector."""
    path = tmp_path_factory.mktemp("v0-models")
    write_test_models(path)
    tool_template = CHATML_TEMPLATE + "{%- if tools %}{{- '<tools>' }}{%- endif %}"
    write_llama_model(path / "acme" / "tool-chat" / "tool-chat-F16.gguf", seed=4, name="Tool Chat",
                      chat_template=tool_template)
    vision = path / "acme" / "vision-chat"
    write_llama_model(vision / "vision-chat-F16.gguf", seed=5, name="Vision Chat")
    write_llama_model(vision / "mmproj-vision-chat-F16.gguf", seed=6, name="Vision Projector")
    return path


@pytest.fixture(scope="module")
def server(start_server: ServerFactory, v0_models: Path) -> ServerProcess:
    """A server of this module's own: the loaded/not-loaded states asserted here depend on nothing else."""
    return start_server(v0_models, "--no-auto-evict")


def get(server: ServerProcess, path: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", headers=server.headers, timeout=60)


def post(server: ServerProcess, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers=server.headers, timeout=60)


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def v0_model(server: ServerProcess, model: str) -> dict[str, Any]:
    return ok(get(server, f"/api/v0/models/{model}"))


def check_model_object(obj: dict[str, Any]) -> None:
    """The documented field set, in LM Studio's order, with its types."""
    keys = list(obj)
    expected = list(MODEL_KEYS)
    if obj["state"] == "loaded":
        expected.append("loaded_context_length")
    if "capabilities" in obj:
        expected.append("capabilities")
        assert obj["capabilities"] and all(isinstance(c, str) for c in obj["capabilities"])
    assert keys == expected, obj
    assert obj["object"] == "model"
    assert obj["type"] in ("llm", "vlm", "embeddings")
    assert obj["compatibility_type"] == "gguf"
    assert obj["state"] in ("loaded", "not-loaded")
    assert isinstance(obj["max_context_length"], int) and obj["max_context_length"] > 0
    assert obj["publisher"] == obj["id"].split("/")[0]
    assert isinstance(obj["arch"], str) and isinstance(obj["quantization"], str)


def instance_context(server: ServerProcess, model: str) -> int:
    instances = ok(get(server, "/api/v1/instances"))["instances"]
    return next(i["context_length"] for i in instances if i["model_key"] == model)


# -- models ----------------------------------------------------------------------------------------


def test_models_lists_every_downloaded_model_in_v0_shape(server: ServerProcess) -> None:
    body = ok(get(server, "/api/v0/models"))
    assert list(body) == ["object", "data"] and body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {CHAT_MODEL, OTHER_CHAT_MODEL, BYTES_MODEL, EMBED_MODEL, TOOL_MODEL, VISION_MODEL}
    for obj in body["data"]:
        check_model_object(obj)
    chat = by_id[OTHER_CHAT_MODEL]  # nothing in this module loads it
    assert chat == {"id": OTHER_CHAT_MODEL, "object": "model", "type": "llm", "publisher": "acme", "arch": "llama",
                    "compatibility_type": "gguf", "quantization": "F16", "state": "not-loaded",
                    "max_context_length": chat["max_context_length"]}
    embed = by_id[EMBED_MODEL]
    assert embed["type"] == "embeddings" and embed["arch"] == "bert" and embed["quantization"] == "F32"
    assert "capabilities" not in embed
    assert by_id[TOOL_MODEL]["capabilities"] == ["tool_use"] and by_id[TOOL_MODEL]["type"] == "llm"
    assert by_id[VISION_MODEL]["type"] == "vlm" and by_id[VISION_MODEL]["capabilities"] == ["vision"]
    assert by_id[CHAT_MODEL]["quantization"] == "F16"  # the default variant of two (F16, F32)


def test_model_by_id_accepts_keys_with_slashes_and_variant_keys(server: ServerProcess) -> None:
    listed = {m["id"]: m for m in ok(get(server, "/api/v0/models"))["data"]}
    assert v0_model(server, OTHER_CHAT_MODEL) == listed[OTHER_CHAT_MODEL]
    assert v0_model(server, OTHER_CHAT_MODEL.upper())["id"] == OTHER_CHAT_MODEL
    variant = v0_model(server, f"{CHAT_MODEL}@f32")
    check_model_object(variant)
    assert variant["id"] == f"{CHAT_MODEL}@f32" and variant["quantization"] == "F32"


@pytest.mark.parametrize("model", ["acme/missing", "nope", "acme/tiny-chat@q9_z"])
def test_unknown_model_is_a_native_404(server: ServerProcess, model: str) -> None:
    response = get(server, f"/api/v0/models/{model}")
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "model_not_found" and error["code"] == "model_not_found"
    assert model in error["message"]


def test_state_flips_to_loaded_with_the_loaded_context_length(server: ServerProcess) -> None:
    # Embeddings first: this is the only test that loads the embedding model.
    assert v0_model(server, EMBED_MODEL)["state"] == "not-loaded"
    ok(post(server, "/api/v0/embeddings", {"model": EMBED_MODEL, "input": "hello"}))
    embed = v0_model(server, EMBED_MODEL)
    check_model_object(embed)
    assert embed["state"] == "loaded"
    assert embed["loaded_context_length"] == instance_context(server, EMBED_MODEL)
    ok(post(server, "/api/v0/chat/completions", {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 1}))
    chat = v0_model(server, CHAT_MODEL)
    check_model_object(chat)
    assert chat["state"] == "loaded"
    assert chat["loaded_context_length"] == instance_context(server, CHAT_MODEL)
    assert chat["loaded_context_length"] <= chat["max_context_length"]
    listed = {m["id"]: m for m in ok(get(server, "/api/v0/models"))["data"]}
    assert listed[CHAT_MODEL] == chat and listed[EMBED_MODEL]["state"] == "loaded"


# -- completions -------------------------------------------------------------------------------------


def check_v0_blocks(body: dict[str, Any], server: ServerProcess, model: str, stop_reason: str) -> dict[str, Any]:
    assert list(body)[-3:] == ["stats", "model_info", "runtime"]
    assert "system_fingerprint" not in body
    usage = body["usage"]
    assert list(usage) == ["prompt_tokens", "completion_tokens", "total_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    stats = body["stats"]
    assert list(stats) == ["tokens_per_second", "time_to_first_token", "generation_time", "stop_reason"]
    assert stats["stop_reason"] in STOP_REASONS and stats["stop_reason"] == stop_reason
    assert all(isinstance(stats[k], float) and stats[k] >= 0
               for k in ("tokens_per_second", "time_to_first_token", "generation_time"))
    assert body["model_info"] == {"arch": "llama", "quant": "F16", "format": "gguf",
                                  "context_length": instance_context(server, model)}
    runtime = body["runtime"]
    assert list(runtime) == ["name", "version", "supported_formats"]
    assert runtime["name"].startswith("llama.cpp-") and isinstance(runtime["version"], str) and runtime["version"]
    assert runtime["supported_formats"] == ["gguf"]
    return stats


def test_chat_completion_has_stats_model_info_and_runtime(server: ServerProcess) -> None:
    body = ok(post(server, "/api/v0/chat/completions",
                   {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}))
    assert list(body)[:6] == ["id", "object", "created", "model", "choices", "usage"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == CHAT_MODEL and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert body["usage"]["completion_tokens"] == 8
    stats = check_v0_blocks(body, server, CHAT_MODEL, "maxPredictedTokensReached")
    assert stats["tokens_per_second"] > 0 and stats["time_to_first_token"] > 0 and stats["generation_time"] > 0


def test_chat_matches_the_openai_endpoint(server: ServerProcess) -> None:
    request = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    v0 = ok(post(server, "/api/v0/chat/completions", request))
    v1 = ok(post(server, "/v1/chat/completions", request))
    assert v0["choices"] == v1["choices"]
    assert {k: v0["usage"][k] for k in v0["usage"]} == {k: v1["usage"][k] for k in v0["usage"]}


def test_stop_reasons(server: ServerProcess) -> None:
    base = {"model": CHAT_MODEL, "messages": MESSAGES, "temperature": 0}
    eos = ok(post(server, "/api/v0/chat/completions", {**base, "max_tokens": 8, "logit_bias": {str(EOS_TOKEN): 100}}))
    assert eos["choices"][0]["finish_reason"] == "stop"
    check_v0_blocks(eos, server, CHAT_MODEL, "eosFound")
    text = ok(post(server, "/api/v0/chat/completions", {**base, "max_tokens": 16}))["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:][:3]
    stopped = ok(post(server, "/api/v0/chat/completions", {**base, "max_tokens": 16, "stop": [stop]}))
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stop not in stopped["choices"][0]["message"]["content"]
    check_v0_blocks(stopped, server, CHAT_MODEL, "stopStringFound")


def test_forced_tool_call_stops_with_tool_calls(server: ServerProcess) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}]
    body = ok(post(server, "/api/v0/chat/completions", {
        "model": TOOL_MODEL, "messages": MESSAGES, "tools": tools, "tool_choice": "required",
        "max_tokens": 400, "temperature": 0}))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] in ("Paris", "Rome")
    check_v0_blocks(body, server, TOOL_MODEL, "toolCalls")
    assert v0_model(server, TOOL_MODEL)["capabilities"] == ["tool_use"]


def test_text_completion_has_the_v0_blocks(server: ServerProcess) -> None:
    body = ok(post(server, "/api/v0/completions",
                   {"model": CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 9, "temperature": 0}))
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == CHAT_MODEL
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["text"] and choice["logprobs"] is None
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 9
    stats = check_v0_blocks(body, server, CHAT_MODEL, "maxPredictedTokensReached")
    assert stats["tokens_per_second"] > 0
    eos = ok(post(server, "/api/v0/completions", {"model": CHAT_MODEL, "prompt": "Once", "max_tokens": 9,
                                                   "logit_bias": {str(EOS_TOKEN): 100}}))
    check_v0_blocks(eos, server, CHAT_MODEL, "eosFound")


def sse(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


@pytest.mark.parametrize(("path", "request_body"), [
    ("/api/v0/chat/completions", {"messages": MESSAGES}),
    ("/api/v0/completions", {"prompt": "Once upon a time"}),
])
def test_streams_match_the_openai_streams(server: ServerProcess, path: str, request_body: dict[str, Any]) -> None:
    request = {"model": CHAT_MODEL, "max_tokens": 6, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, **request_body}
    v0 = sse(post(server, path, request))
    v1 = sse(post(server, path.replace("/api/v0", "/v1"), request))
    strip = ("id", "created", "usage")  # usage differs in cached_tokens only (the second run hits the cache)
    assert [{k: v for k, v in c.items() if k not in strip} for c in v0] == \
           [{k: v for k, v in c.items() if k not in strip} for c in v1]
    assert v0[-1]["usage"]["total_tokens"] == v1[-1]["usage"]["total_tokens"]
    assert v0[-1]["usage"]["completion_tokens"] == 6
    assert v0[-2]["choices"][0]["finish_reason"] == "length"


def test_embeddings(server: ServerProcess) -> None:
    body = ok(post(server, "/api/v0/embeddings", {"model": EMBED_MODEL, "input": ["hello", "world"]}))
    assert list(body) == ["object", "data", "model", "usage"] and body["object"] == "list"
    assert body["model"] == f"{EMBED_MODEL}@f32"  # the variant key, as LM Studio reports it
    assert [d["index"] for d in body["data"]] == [0, 1]
    for item in body["data"]:
        assert list(item) == ["object", "embedding", "index"] and item["object"] == "embedding"
        assert item["embedding"] and all(isinstance(x, float) for x in item["embedding"])
    assert len(body["data"][0]["embedding"]) == len(body["data"][1]["embedding"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    v1 = ok(post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": ["hello", "world"]}))
    assert v1["data"] == body["data"]
    listed = {m["id"]: m for m in ok(get(server, "/api/v0/models"))["data"]}
    assert listed[EMBED_MODEL]["type"] == "embeddings"


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), [
    ("/api/v0/chat/completions", {"model": "acme/missing", "messages": MESSAGES}),
    ("/api/v0/completions", {"model": "acme/missing", "prompt": "hi"}),
    ("/api/v0/embeddings", {"model": "acme/missing", "input": "hi"}),
])
def test_unknown_model_in_a_request_is_a_native_404(server: ServerProcess, path: str, body: dict[str, Any]) -> None:
    response = post(server, path, body)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/api/v0/chat/completions", {"model": CHAT_MODEL}, "messages"),
    ("/api/v0/chat/completions", {"model": CHAT_MODEL, "messages": MESSAGES, "temperature": 9}, "temperature"),
    ("/api/v0/completions", {"model": CHAT_MODEL, "prompt": "hi", "n": 2}, "n"),
    ("/api/v0/embeddings", {"model": EMBED_MODEL}, "input"),
    ("/api/v0/embeddings", {"model": CHAT_MODEL, "input": "hi"}, "model"),  # not an embedding model
    ("/api/v0/chat/completions", {"model": EMBED_MODEL, "messages": MESSAGES}, "model"),
])
def test_bad_bodies_are_native_400s(server: ServerProcess, path: str, body: dict[str, Any], param: str) -> None:
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["param"] == param and error["message"]


def test_malformed_json_is_a_400(server: ServerProcess) -> None:
    response = httpx.post(f"{server.base_url}/api/v0/chat/completions", content=b"{nope",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"


def test_every_v0_route_needs_the_token(start_server: ServerFactory, v0_models: Path) -> None:
    secured = start_server(v0_models, "--api-token", TOKEN, token=TOKEN)
    requests = [("GET", "/api/v0/models", None), ("GET", f"/api/v0/models/{CHAT_MODEL}", None),
                ("POST", "/api/v0/chat/completions", {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 1}),
                ("POST", "/api/v0/completions", {"model": CHAT_MODEL, "prompt": "hi", "max_tokens": 1}),
                ("POST", "/api/v0/embeddings", {"model": EMBED_MODEL, "input": "hi"})]
    for method, path, body in requests:
        url = f"{secured.base_url}{path}"
        for headers in ({}, {"Authorization": "Bearer sk-lm-Wrong123:abcdefghijABCDEFGHIJ"}):
            response = httpx.request(method, url, json=body, headers=headers, timeout=60)
            assert response.status_code == 401, (path, response.text)
            assert "LM Studio API token" in response.json()["error"]["message"]
    assert ok(httpx.get(f"{secured.base_url}/api/v0/models", headers=secured.headers))["data"]
