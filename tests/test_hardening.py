"""What an attacker or a careless client can send a real `lmkube serve`: nothing kills it, stalls it or bloats
it. Regression tests for issue 15: tiny contexts (a llama.cpp abort), lone surrogates, bodies read before
the token check and without a size limit, huge prompts, unbounded explicit loads, and the smaller holes."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import CHAT_MODEL, EMBED_MODEL, OTHER_CHAT_MODEL, ServerProcess, write_test_models

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

ServerFactory = Callable[..., ServerProcess]

TOKEN = "sk-lm-hardening:0123456789abcdefghij"
HUGE_MODEL = "acme/huge-context"  # trained for 2**30 tokens: its full context cannot fit any test machine
HUGE_CONTEXT = 1 << 30
BODY_LIMIT_MIB = 1
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hardening-models")
    write_test_models(path)
    write_llama_model(path / "acme" / "huge-context" / "huge-context-F16.gguf", seed=5, name="Huge Context",
                      shape=LlamaShape(n_ctx_train=HUGE_CONTEXT))
    return path


@pytest.fixture(scope="module")
def guarded(start_server: ServerFactory, models: Path) -> ServerProcess:
    """Token required, 1 MiB bodies at most, 2 slots."""
    return start_server(models, "--api-token", TOKEN, "--max-body-size", str(BODY_LIMIT_MIB), "--parallel", "2",
                        token=TOKEN)


@pytest.fixture(scope="module")
def tiny_context(start_server: ServerFactory, models: Path) -> ServerProcess:
    """`--ctx-size 2` with 4 slots: the context a load asks for is raised to one cell per slot."""
    return start_server(models, "--ctx-size", "2", "--parallel", "4")


def rss_bytes(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def alive(server: ServerProcess) -> None:
    assert server.process.poll() is None, server.log()[-3000:]
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object of any family's envelope (Anthropic's `{"type": "error", "error": {...}}` included)."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]


def raw_request(server: ServerProcess, head: str, body: bytes = b"") -> bytes:
    """Sends a hand-made request (headers as given, then `body`) and returns what the server answers."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_a_context_smaller_than_the_slots_cannot_abort_the_server(guarded: ServerProcess,
                                                                   tiny_context: ServerProcess) -> None:
    with guarded.client() as client:
        load = client.post("/api/v1/models/load", json={"model": CHAT_MODEL, "identifier": "one-cell",
                                                        "context_length": 1, "parallel": 8, "echo_load_config": True})
        assert load.status_code == 200, load.text
        assert load.json()["load_config"]["context_length"] >= 8

        async def chats() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=guarded.base_url, headers=guarded.headers, timeout=120) as c:
                body = {"model": "one-cell", "messages": MESSAGES, "max_tokens": 4}
                return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(16)))

        assert [r.status_code for r in asyncio.run(chats())] == [200] * 16
        native = client.post("/api/v1/chat", json={"model": OTHER_CHAT_MODEL, "input": "hi", "context_length": 1,
                                                   "max_output_tokens": 4})
        assert native.status_code == 200, native.text
        assert client.post("/api/v1/models/unload", json={"instance_id": "one-cell"}).status_code == 200
    alive(guarded)
    with tiny_context.client() as client:
        async def parallel() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=tiny_context.base_url, timeout=120) as c:
                body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 4}
                return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(6)))

        assert [r.status_code for r in asyncio.run(parallel())] == [200] * 6
    alive(tiny_context)


GENERATION_ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "a\ud800b"}]}),
    ("/v1/completions", {"model": CHAT_MODEL, "prompt": "\udc00"}),
    ("/v1/embeddings", {"model": EMBED_MODEL, "input": "\ud800"}),
    ("/v1/responses", {"model": CHAT_MODEL, "input": "\ud800"}),
    ("/v1/messages", {"model": CHAT_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "\ud800"}]}),
    ("/v1/messages/count_tokens", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "\ud800"}]}),
    ("/api/v1/chat", {"model": CHAT_MODEL, "input": "\ud800", "stream": True}),
    ("/api/v0/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "system", "content": "\ud800"}]}),
    ("/api/v0/completions", {"model": CHAT_MODEL, "prompt": "\ud800"}),
    ("/api/v0/embeddings", {"model": EMBED_MODEL, "input": ["ok", "\ud800"]}),
]


@pytest.mark.parametrize(("path", "body"), GENERATION_ROUTES, ids=[p for p, _ in GENERATION_ROUTES])
def test_a_lone_surrogate_is_a_400_in_the_family_shape_and_keeps_the_connection(
    guarded: ServerProcess, path: str, body: dict[str, Any]
) -> None:
    with guarded.client() as client:
        # json.dumps writes the surrogate as a \ud800 escape (httpx's json= cannot encode it at all).
        response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert "close" not in response.headers.get("connection", "")
        error = error_of(response)
        assert "surrogate" in error["message"]
        expected = {"/v1/messages": "invalid_request_error", "/api/": "invalid_request"}
        kind = next((v for k, v in expected.items() if path.startswith(k)), "invalid_request_error")
        assert error["type"] == kind
        # The same keep-alive connection serves the next request.
        assert client.get("/v1/models").status_code == 200
    alive(guarded)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/api/v1/chat"])
def test_a_surrogate_written_as_raw_bytes_is_a_400_too(guarded: ServerProcess, path: str) -> None:
    # ED A0 80 is U+D800 encoded as if it were a character: not UTF-8, yet Python's json module decodes it
    # ("surrogatepass"), and the tokenizer then failed with a 500.
    text = b'"a\xed\xa0\x80b"'
    body = (b'{"model": "%s", "max_tokens": 4, "max_output_tokens": 4, "input": %s, '
            b'"messages": [{"role": "user", "content": %s}]}' % (CHAT_MODEL.encode(), text, text))
    with guarded.client() as client:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert "surrogate" in error_of(response)["message"]
        assert client.get("/v1/models").status_code == 200
    alive(guarded)


def test_a_surrogate_pair_is_ordinary_text(guarded: ServerProcess) -> None:
    with guarded.client() as client:
        body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "smile \U0001f600"}], "max_tokens": 2}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text


def test_unauthenticated_and_oversized_bodies_are_refused_before_they_are_read(guarded: ServerProcess) -> None:
    declared = 300 << 20
    # No body is sent at all: the answer can only come from the headers.
    unauthenticated = raw_request(guarded, f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                           f"Content-Type: application/json\r\nContent-Length: {declared}\r\n")
    assert unauthenticated.startswith(b"HTTP/1.1 401"), unauthenticated[:300]
    assert b"invalid_api_key" in unauthenticated
    too_large = raw_request(guarded, f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                     f"Content-Type: application/json\r\nContent-Length: {declared}\r\n")
    assert too_large.startswith(b"HTTP/1.1 413"), too_large[:300]
    assert b'"type":"request_too_large"' in too_large  # Anthropic's own error type
    # Chunked, the size is known only as it arrives: refused once it passes the limit.
    chunk = b"x" * (64 << 10)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range((BODY_LIMIT_MIB << 20) // len(chunk) + 1))
    chunked = raw_request(guarded, f"POST /api/v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                   "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", chunks)
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:300]
    assert b'"code":"request_too_large"' in chunked
    # The public probes stay open without a token; everything else needs one, body or not.
    assert httpx.get(f"{guarded.base_url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{guarded.base_url}/v1/models", timeout=30).status_code == 401
    alive(guarded)


def test_rss_returns_near_its_baseline_after_a_burst_of_oversized_requests(guarded: ServerProcess) -> None:
    with guarded.client() as client:
        assert client.get("/v1/models").status_code == 200
    baseline = rss_bytes(guarded)
    body = b"[" + b'"padding",' * ((2 << 20) // 10) + b"0]"  # 2 MiB: twice the limit

    async def burst() -> list[int]:
        async def one(i: int) -> int:
            headers = guarded.headers if i % 2 else {}  # half without a token
            async with httpx.AsyncClient(base_url=guarded.base_url, headers=headers, timeout=120) as c:
                try:
                    return (await c.post("/v1/chat/completions", content=body,
                                         headers={"content-type": "application/json"})).status_code
                except httpx.TransportError:  # the server answered and closed while the body was still going out
                    return 0

        return await asyncio.gather(*(one(i) for i in range(40)))

    statuses = asyncio.run(burst())
    assert set(statuses) <= {401, 413, 0} and {401, 413} & set(statuses), statuses
    alive(guarded)
    assert rss_bytes(guarded) < baseline + (48 << 20), (baseline, rss_bytes(guarded))


def test_a_huge_prompt_is_refused_early_while_other_requests_flow(tiny_context: ServerProcess) -> None:
    huge = "word " * (4 << 20)  # 20 MiB of text

    async def main() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=tiny_context.base_url, timeout=120) as client:
            refused = asyncio.create_task(client.post("/v1/chat/completions", json={
                "model": CHAT_MODEL, "messages": [{"role": "user", "content": huge}]}))
            others = [await client.get("/health"), await client.post("/v1/chat/completions", json={
                "model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 4})]
            return await refused, others

    refused, others = asyncio.run(main())
    assert refused.status_code == 400, refused.text[:500]
    error = error_of(refused)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert "at least" in error["message"]  # decided from the text's length, not by tokenizing 20 MiB
    assert [r.status_code for r in others] == [200, 200]
    for path, body in (("/v1/completions", {"model": CHAT_MODEL, "prompt": huge}),
                       ("/api/v1/chat", {"model": CHAT_MODEL, "input": huge})):
        response = httpx.post(f"{tiny_context.base_url}{path}", json=body, timeout=120)
        assert response.status_code == 400, response.text[:500]
        assert error_of(response)["code"] == "context_length_exceeded"
    alive(tiny_context)


def test_explicit_loads_that_do_not_fit_the_free_memory_are_refused(guarded: ServerProcess) -> None:
    with guarded.client() as client:
        load = {"model": HUGE_MODEL, "context_length": HUGE_CONTEXT}
        estimate = client.post("/api/v1/models/load", json={**load, "estimate_only": True}).json()
        assert estimate["fits"] is False
        refused = client.post("/api/v1/models/load", json=load)
        assert refused.status_code == 409, refused.text
        error = error_of(refused)
        assert (error["code"], error["param"]) == ("insufficient_memory", "model")
        assert "GiB" in error["message"] and "evict" in error["message"] and "force" in error["message"]
        # Evicting cannot make room for it, so nothing is unloaded for it.
        assert client.post("/api/v1/models/load", json={"model": CHAT_MODEL, "identifier": "bystander"}).status_code \
            == 200
        assert client.post("/api/v1/models/load", json={**load, "evict": True}).status_code == 409
        loaded = [i["id"] for i in client.get("/api/v1/instances").json()["instances"]]
        assert "bystander" in loaded and not any(i.startswith(HUGE_MODEL) for i in loaded)
        # A context that fits loads as before.
        small = client.post("/api/v1/models/load", json={"model": HUGE_MODEL, "context_length": 4096})
        assert small.status_code == 200, small.text
        for instance in ("bystander", small.json()["instance_id"]):
            assert client.post("/api/v1/models/unload", json={"instance_id": instance}).status_code == 200


def test_the_smaller_holes(guarded: ServerProcess) -> None:
    with guarded.client() as client:
        not_allowed = client.delete("/v1/chat/completions")
        assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "POST"
        assert client.put(f"/v1/models/{CHAT_MODEL}").headers["allow"] == "GET"
        for method, path, allow in (("GET", "/v1/messages", "POST"), ("GET", "/v1/responses", "POST"),
                                    ("PUT", "/api/v1/models", "GET"), ("GET", "/api/v1/chat", "POST"),
                                    ("PATCH", "/api/v0/models", "GET"), ("DELETE", "/health", "GET")):
            refused = client.request(method, path)
            assert (refused.status_code, refused.headers.get("allow")) == (405, allow), (method, path, refused.text)
            assert "not allowed" in error_of(refused)["message"]

        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/api/v1/chat",
                     "/api/v0/chat/completions", "/api/v1/models/load"):
            no_body = client.post(path)
            assert no_body.status_code == 400 and "None" not in error_of(no_body)["message"], (path, no_body.text)
            assert "needs a JSON body" in error_of(no_body)["message"], (path, no_body.text)

        # No family generates for a limit of 0 tokens (the text completions routes wrote one token).
        for path, field, body in (
            ("/v1/chat/completions", "max_tokens", {"messages": MESSAGES}),
            ("/v1/chat/completions", "max_completion_tokens", {"messages": MESSAGES}),
            ("/v1/completions", "max_tokens", {"prompt": "hello"}),
            ("/api/v0/completions", "max_tokens", {"prompt": "hello"}),
            ("/api/v0/chat/completions", "max_tokens", {"messages": MESSAGES}),
            ("/v1/responses", "max_output_tokens", {"input": "hello"}),
            ("/api/v1/chat", "max_output_tokens", {"input": "hello"}),
            ("/v1/messages", "max_tokens", {"messages": MESSAGES}),
        ):
            zero = client.post(path, json={"model": CHAT_MODEL, **body, field: 0})
            assert zero.status_code == 400, (path, zero.text)
            assert field in error_of(zero)["message"] and error_of(zero).get("param", field) == field, zero.text

        def tools(count: int, parameters: dict[str, Any]) -> list[dict[str, Any]]:
            return [{"type": "function", "function": {"name": f"tool_{i}", "parameters": parameters}}
                    for i in range(count)]

        good = {"type": "object", "properties": {"city": {"type": "string"}}}
        bad = client.post("/v1/chat/completions", json={
            "model": CHAT_MODEL, "messages": MESSAGES, "tools": tools(1, {"type": "object", "properties": []})})
        assert bad.status_code == 400 and error_of(bad)["param"] == "tools", bad.text
        assert "not a valid JSON Schema" in error_of(bad)["message"]
        # The same schema in the other families' tool shapes.
        for path, body in (("/v1/responses", {"input": "hello", "tools": [
                               {"type": "function", "name": "f", "parameters": {"type": "object", "properties": []}}]}),
                           ("/v1/messages", {"messages": MESSAGES, "max_tokens": 4, "tools": [
                               {"name": "f", "input_schema": {"type": "object", "properties": []}}]})):
            refused = client.post(path, json={"model": CHAT_MODEL, **body})
            assert refused.status_code == 400, refused.text
            assert "not a valid JSON Schema" in error_of(refused)["message"]
        too_many = client.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": MESSAGES,
                                                             "tools": tools(1025, good)})
        assert too_many.status_code == 400 and "1024" in error_of(too_many)["message"]
        anthropic_tools = [{"name": f"tool_{i}", "input_schema": good} for i in range(1025)]
        too_many = client.post("/v1/messages", json={"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 4,
                                                     "tools": anthropic_tools})
        assert too_many.status_code == 400 and "at most 1024 tools" in error_of(too_many)["message"]
        # A thousand tools with a forced call: the grammar still parses (it nested one group per tool). The
        # grammar is checked before the prompt is counted, and the tools' descriptions written into the
        # prompt (the test template ignores `tools`) then overflow the 2048-token context: a 400 about the
        # prompt, not about the grammar.
        many = client.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 8,
                                                         "tools": tools(1000, good), "tool_choice": "required"})
        assert many.status_code == 400, many.text[:500]
        assert (error_of(many)["code"], error_of(many)["param"]) == ("context_length_exceeded", "messages")
        fewer = client.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 8,
                                                          "tools": tools(5, good), "tool_choice": "required"})
        assert fewer.status_code == 200, fewer.text[:500]

        for body, param in (({"model": CHAT_MODEL, "identifier": "../../etc/passwd"}, "identifier"),
                            ({"model": "../../etc/passwd"}, "model"),
                            ({"model": CHAT_MODEL, "identifier": "a\\b"}, "identifier")):
            refused = client.post("/api/v1/models/load", json=body)
            assert refused.status_code == 400 and error_of(refused)["param"] == param, refused.text
        unload = client.post("/api/v1/models/unload", json={"instance_id": "../x"})
        assert unload.status_code == 400 and error_of(unload)["param"] == "instance_id"
    alive(guarded)
