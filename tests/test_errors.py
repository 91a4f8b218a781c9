"""Error responses against real `lmkube serve` processes: OpenAI's error shape on /v1, LM Studio's native
shape on /api/v1, the right status and `param` for bad input, and never a 500 for a client's mistake."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import BYTES_MODEL, CHAT_MODEL, EMBED_MODEL, OTHER_CHAT_MODEL, ServerProcess

from lmkube.synthetic_gguf import write_llama_model

ServerFactory = Callable[..., ServerProcess]

ALL_MODELS = (BYTES_MODEL, OTHER_CHAT_MODEL, CHAT_MODEL, EMBED_MODEL)
MESSAGES = [{"role": "user", "content": "hello"}]
N_VOCAB = 512  # the generated chat models' vocabulary (LlamaShape's default)
NATIVE_ERROR_TYPES = {"invalid_request", "unknown", "mcp_connection_error", "plugin_connection_error",
                      "not_implemented", "model_not_found", "job_not_found", "internal_error"}
CHAT = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 1}
COMPLETION = {"model": CHAT_MODEL, "prompt": "hello", "max_tokens": 1}
EMBEDDING = {"model": EMBED_MODEL, "input": "hello"}


@pytest.fixture(scope="module")
def server(start_server: ServerFactory, models_dir: Path) -> ServerProcess:
    """A server of this module's own, so the models these tests JIT-load evict nothing elsewhere."""
    return start_server(models_dir)


@pytest.fixture(scope="module")
def small_context_server(start_server: ServerFactory, models_dir: Path) -> ServerProcess:
    return start_server(models_dir, "--ctx-size", "64", "--no-auto-evict")


def post(server: ServerProcess, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers=server.headers, timeout=60, **kwargs)


def openai_error(response: httpx.Response, status: int, *, param: str | None = None,
                 code: str | None = None) -> str:
    """Checks OpenAI's error envelope; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


def native_error(response: httpx.Response, status: int, *, type: str = "invalid_request",
                 param: str | None = None, code: str | None = None) -> str:
    """Checks LM Studio's native envelope {"error": {"type", "message", "code"?, "param"?}}; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert {"type", "message"} <= set(error) <= {"type", "message", "code", "param"}
    assert None not in error.values()  # absent rather than null, unlike the OpenAI shape
    assert error["type"] in NATIVE_ERROR_TYPES and error["type"] == type, error
    assert error.get("param") == param, error
    assert error.get("code") == code, error
    return error["message"]


def instance_context(server: ServerProcess, model: str) -> int:
    instances = httpx.get(f"{server.base_url}/api/v1/instances", headers=server.headers).json()["instances"]
    return next(i["context_length"] for i in instances if i["model_key"] == model)


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


# -- unknown models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/completions", COMPLETION),
    ("/v1/completions", {**COMPLETION, "stream": True}),
    ("/v1/embeddings", EMBEDDING),
])
def test_unknown_model_is_a_404_listing_the_available_models(server: ServerProcess, path: str,
                                                             body: dict[str, Any]) -> None:
    message = openai_error(post(server, path, {**body, "model": "acme/missing"}), 404, param="model",
                           code="model_not_found")
    assert message.startswith('Model "acme/missing" not found. Please specify a valid model.')
    assert all(f"  - {key}" in message for key in ALL_MODELS)


def test_unknown_model_through_the_sdk(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="acme/missing", messages=MESSAGES, stream=True)
    assert (caught.value.code, caught.value.param, caught.value.type) == (
        "model_not_found", "model", "invalid_request_error")
    with pytest.raises(openai.NotFoundError) as retrieved:
        client.models.retrieve("acme/missing")
    assert retrieved.value.code == "model_not_found"


# -- malformed requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@pytest.mark.parametrize("content", [b"{not json", b'{"model": "acme/tiny-chat",}', b"[1, 2]", b'"text"', b"null"])
def test_malformed_json_is_a_400(server: ServerProcess, path: str, content: bytes) -> None:
    response = httpx.post(f"{server.base_url}{path}", content=content, headers={"content-type": "application/json"})
    openai_error(response, 400)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"model": CHAT_MODEL}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES}, "model"),
    ("/v1/chat/completions", {**CHAT, "temperature": 5}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {str(N_VOCAB): 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"300": 101}}, "logit_bias.300"),  # OpenAI's range: ±100
    ("/v1/chat/completions", {**CHAT, "max_tokens": -2}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "stop": [str(i) for i in range(17)]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": 5}, "stop"),
    ("/v1/chat/completions", {**CHAT, "ttl": 0}, "ttl"),
    ("/v1/chat/completions", {**CHAT, "stream": "maybe"}, "stream"),
    ("/v1/completions", {"model": CHAT_MODEL}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": {}}, "prompt"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/embeddings", {"model": EMBED_MODEL}, "input"),
    ("/v1/embeddings", {**EMBEDDING, "encoding_format": "hex"}, "encoding_format"),
    ("/v1/embeddings", {**EMBEDDING, "dimensions": 0}, "dimensions"),
])
def test_schema_violations_are_400s_naming_the_param(server: ServerProcess, path: str, body: dict[str, Any],
                                                     param: str) -> None:
    message = openai_error(post(server, path, body), 400, param=param)
    assert param.split(".")[0] in message


def test_out_of_vocabulary_token_ids_are_400s(server: ServerProcess) -> None:
    for prompt in ([1, N_VOCAB], [-1], [], [2**70]):
        message = openai_error(post(server, "/v1/completions", {**COMPLETION, "prompt": prompt}), 400, param="prompt")
        assert f"0..{N_VOCAB - 1}" in message
    for tokens in ([1, 99999], [[5], [-3]], [[]]):
        openai_error(post(server, "/v1/embeddings", {**EMBEDDING, "input": tokens}), 400, param="input")
    message = openai_error(post(server, "/v1/chat/completions", {**CHAT, "logit_bias": {"99999": 5}}), 400,
                           param="logit_bias")
    assert "99999" in message


# -- prompts longer than the context -----------------------------------------------------------------


def test_prompts_longer_than_the_context_are_400s(small_context_server: ServerProcess) -> None:
    server = small_context_server
    assert post(server, "/v1/completions", COMPLETION).status_code == 200
    n_ctx = instance_context(server, CHAT_MODEL)
    assert 64 <= n_ctx < 2048  # --ctx-size applies (llama.cpp may round it up), well below the trained 2048

    # The last prompt that fits, then the first that does not.
    fits = post(server, "/v1/completions", {**COMPLETION, "prompt": [300] * (n_ctx - 1)})
    assert fits.status_code == 200, fits.text
    for n_prompt in (n_ctx, n_ctx + 5):
        for stream in (False, True):  # a stream is refused with a status before it starts
            response = post(server, "/v1/completions", {**COMPLETION, "prompt": [300] * n_prompt, "stream": stream})
            message = openai_error(response, 400, param="prompt", code="context_length_exceeded")
            assert {n_ctx, n_prompt} <= set(numbers(message)), message

    long_chat = {**CHAT, "messages": [{"role": "user", "content": "hello world " * n_ctx}]}
    for stream in (False, True):
        message = openai_error(post(server, "/v1/chat/completions", {**long_chat, "stream": stream}), 400,
                               param="messages", code="context_length_exceeded")
        assert n_ctx in numbers(message)
        assert any(n > n_ctx for n in numbers(message)), message  # the prompt's own length

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=long_chat["messages"], stream=True)
    assert caught.value.code == "context_length_exceeded"
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200  # and the server carries on


def test_embedding_inputs_longer_than_the_context_are_400s(small_context_server: ServerProcess) -> None:
    server = small_context_server
    assert post(server, "/v1/embeddings", EMBEDDING).status_code == 200
    n_ctx = instance_context(server, EMBED_MODEL)
    response = post(server, "/v1/embeddings", {**EMBEDDING, "input": [[1] * 5, [1] * (n_ctx + 1)]})
    message = openai_error(response, 400, param="input", code="context_length_exceeded")
    assert {n_ctx, n_ctx + 1} <= set(numbers(message))


# -- routes ------------------------------------------------------------------------------------------


def test_unknown_routes_are_json_404s(server: ServerProcess) -> None:
    for method, path in (("GET", "/v1/nope"), ("POST", "/v1/chat/complete"), ("GET", "/nope")):
        response = httpx.request(method, f"{server.base_url}{path}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert f"{method} {path}" in response.json()["error"]["message"]
    native = httpx.post(f"{server.base_url}/api/v1/nope", json={})
    assert "POST /api/v1/nope" in native_error(native, 404, code="not_found")
    wrong_method = httpx.get(f"{server.base_url}/v1/chat/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_native_routes_use_the_native_error_shape(server: ServerProcess) -> None:
    load, unload = "/api/v1/models/load", "/api/v1/models/unload"
    assert "model" in native_error(post(server, load, {}), 400, param="model")
    assert "bogus" in native_error(post(server, load, {"model": CHAT_MODEL, "bogus": 1}), 400, param="bogus")
    native_error(post(server, load, {"model": CHAT_MODEL, "gpu": 5}), 400, param="gpu")
    native_error(post(server, load, {"model": CHAT_MODEL, "gpu": "half"}), 400, param="gpu")
    native_error(post(server, load, {"model": CHAT_MODEL, "context_length": 0}), 400, param="context_length")
    native_error(post(server, load, {"model": CHAT_MODEL, "ttl": -1}), 400, param="ttl")
    native_error(post(server, load, {"model": CHAT_MODEL, "parallel": 0}), 400, param="parallel")
    malformed = httpx.post(f"{server.base_url}{load}", content=b"{nope", headers={"content-type": "application/json"})
    assert "JSON" in native_error(malformed, 400)
    native_error(post(server, unload, {}), 400, param="instance_id")
    native_error(post(server, unload, {"instance_id": "nope"}), 404, type="model_not_found",
                 param="instance_id", code="model_not_found")
    missing = native_error(post(server, load, {"model": "acme/missing"}), 404, type="model_not_found",
                           param="model", code="model_not_found")
    assert all(key in missing for key in ALL_MODELS)


def test_oversized_load_settings_are_capped_not_fatal(server: ServerProcess) -> None:
    """Regression: an eval_batch_size past 2**32 wrapped in ctypes and killed the server (or made it 500)."""
    for extra in ({"eval_batch_size": 99_999_999_999}, {"eval_batch_size": 2**32}, {"context_length": 10**12}):
        response = post(server, "/api/v1/models/load", {"model": CHAT_MODEL, "identifier": "big",
                                                          "echo_load_config": True, **extra})
        assert response.status_code == 200, response.text
        assert response.json()["load_config"]["context_length"] <= 2048  # capped at the trained context
        completion = post(server, "/v1/completions", {**COMPLETION, "model": "big", "prompt": "hello " * 50})
        assert completion.status_code == 200, completion.text
        assert post(server, "/api/v1/models/unload", {"instance_id": "big"}).status_code == 200
    assert server.process.poll() is None


# -- chat templates ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template_server(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("template-models")
    write_llama_model(models / "acme" / "raising" / "raising-F16.gguf", name="Raising",
                      chat_template="{% if messages %}{{ raise_exception('nope') }}{% endif %}")
    write_llama_model(models / "acme" / "broken" / "broken-F16.gguf", name="Broken", chat_template="{% if %}")
    write_llama_model(models / "acme" / "dividing" / "dividing-F16.gguf", name="Dividing",
                      chat_template="{{ 1 // (messages | length - 1) }}")
    return start_server(models)


def test_a_template_that_raises_is_a_400_with_its_message(template_server: ServerProcess) -> None:
    for stream in (False, True):
        response = post(template_server, "/v1/chat/completions", {**CHAT, "model": "acme/raising", "stream": stream})
        assert openai_error(response, 400, param="messages", code="chat_template_error") == "nope"
    client = openai.OpenAI(base_url=f"{template_server.base_url}/v1", api_key="lm-studio", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="acme/raising", messages=MESSAGES, max_tokens=1)
    assert isinstance(caught.value.body, dict) and caught.value.body["message"] == "nope"
    # Text completions use no template, so the model still serves them.
    assert post(template_server, "/v1/completions", {**COMPLETION, "model": "acme/raising"}).status_code == 200


def test_any_exception_a_template_raises_is_a_400(template_server: ServerProcess) -> None:
    response = post(template_server, "/v1/chat/completions", {**CHAT, "model": "acme/dividing"})
    assert "division" in openai_error(response, 400, param="messages", code="chat_template_error")


def test_a_template_that_does_not_compile_is_a_400_not_a_failed_load(template_server: ServerProcess) -> None:
    response = post(template_server, "/v1/chat/completions", {**CHAT, "model": "acme/broken"})
    assert "does not compile" in openai_error(response, 400, param="messages", code="chat_template_error")
    assert post(template_server, "/v1/completions", {**COMPLETION, "model": "acme/broken"}).status_code == 200


# -- no 500s for bad input ---------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, Any]] = [
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "bogus"}]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{}]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": ["x"]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": None}),
    ("/v1/chat/completions", {**CHAT, "model": ""}),
    ("/v1/chat/completions", {**CHAT, "model": 5}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "abc"}),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}),
    ("/v1/chat/completions", {**CHAT, "logit_bias": [1]}),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"1": "x"}}),
    ("/v1/chat/completions", {**CHAT, "tools": "x"}),
    ("/v1/chat/completions", {**CHAT, "tools": [1]}),
    ("/v1/chat/completions", {**CHAT, "seed": "x"}),
    ("/v1/chat/completions", {**CHAT, "n": 0}),
    ("/v1/chat/completions", {**CHAT, "top_k": -1}),
    ("/v1/chat/completions", {**CHAT, "response_format": "json"}),
    ("/v1/chat/completions", {**CHAT, "stream_options": "x"}),
    ("/v1/chat/completions", {**CHAT, "ttl": -5}),
    ("/v1/completions", {**COMPLETION, "prompt": [["a"]]}),
    ("/v1/completions", {**COMPLETION, "prompt": [[1], [2]]}),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}),
    ("/v1/completions", {**COMPLETION, "prompt": [1.5]}),
    ("/v1/completions", {**COMPLETION, "echo": "x"}),
    ("/v1/embeddings", {**EMBEDDING, "input": {}}),
    ("/v1/embeddings", {**EMBEDDING, "input": [""]}),
    ("/v1/embeddings", {**EMBEDDING, "input": ""}),
    ("/v1/embeddings", {**EMBEDDING, "input": [1.5]}),
    ("/v1/embeddings", {**EMBEDDING, "input": ["a", 1]}),
    ("/v1/embeddings", {**EMBEDDING, "input": [[1, "a"]]}),
    ("/v1/embeddings", {**EMBEDDING, "model": CHAT_MODEL}),
    ("/v1/embeddings", {**EMBEDDING, "dimensions": "x"}),
    ("/api/v1/models/load", {"model": CHAT_MODEL, "identifier": ""}),
    ("/api/v1/models/load", {"model": ""}),
    ("/api/v1/models/load", []),
    ("/api/v1/models/unload", {"instance_id": 5}),
    ("/api/v1/models/unload", {"instance_id": ""}),
]

# Odd but acceptable: these may succeed, they just must not break the server.
ODD_BODIES: list[tuple[str, Any]] = [
    ("/v1/chat/completions", {**CHAT, "seed": 2**70}),
    ("/v1/chat/completions", {**CHAT, "seed": -1}),
    ("/v1/chat/completions", {**CHAT, "top_k": 2**70}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2**70}),
    ("/v1/chat/completions", {**CHAT, "ttl": 2**70}),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}),
    ("/v1/chat/completions", {**CHAT, "repeat_penalty": 1e308}),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"300": 1e308}}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": None,
                                                    "tool_calls": [{"bogus": 1}]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\u0000<|im_end|></s>\U0001f600"}]}),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}),
    ("/v1/completions", {**COMPLETION, "prompt": ""}),
    ("/v1/completions", {**COMPLETION, "prompt": [""]}),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}),
]


def test_bad_input_is_never_a_server_error(server: ServerProcess, small_context_server: ServerProcess) -> None:
    problems = []
    for path, body in BAD_BODIES:
        response = post(server, path, body)
        if not 400 <= response.status_code < 500:
            problems.append(f"{path} {body!r} -> {response.status_code} {response.text[:200]}")
    for path, body in ODD_BODIES:  # the small context keeps a huge max_tokens short
        response = post(small_context_server, path, body)
        if response.status_code >= 500:
            problems.append(f"{path} {body!r} -> {response.status_code} {response.text[:200]}")
    assert not problems, "\n".join(problems)
    for used in (server, small_context_server):
        assert post(used, "/v1/chat/completions", CHAT).status_code == 200
        assert used.process.poll() is None
        assert "Traceback" not in used.log()
