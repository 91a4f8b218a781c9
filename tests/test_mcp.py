"""MCP integrations on /api/v1/chat: a real MCP server (tests/mcp_test_server.py, the `mcp` SDK over
Streamable HTTP) and a random-weight Qwen2.5-template model whose first round is forced to call a tool
with the lmkube `tool_choice` extension."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import jsonschema
import pytest
from lmkube.server.errors import APIError
from lmkube.server.mcp import open_toolbox, parse_integrations
from support import ServerProcess, free_port

from lmkube.synthetic_gguf import write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
MODEL = "acme/qwen-tools"
TOKEN = "sk-lm-mcptest:secretsecret"
ADD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("mcp-models")
    write_llama_model(models / "acme" / "qwen-tools" / "qwen-tools-F16.gguf", seed=5,
                      chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(),
                      extra_special_tokens=("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"))
    return models


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, mcp_url: str) -> Path:
    home = tmp_path_factory.mktemp("mcp-home")
    (home / "mcp.json").write_text(json.dumps({"mcpServers": {
        "calc": {"url": mcp_url, "headers": {"X-Test-Key": "open-sesame"}},
        "bad": {"args": ["no command, no url"]},
        "down": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
    }}))
    return home


@pytest.fixture(scope="module")
def remote_server(start_server, models: Path, home: Path) -> ServerProcess:
    """Allows per-request MCP servers; no API tokens (so no mcp.json plugins)."""
    return start_server(models, "--allow-remote-mcp", env={"LMKUBE_HOME": str(home)})


@pytest.fixture(scope="module")
def token_server(start_server, models: Path, home: Path) -> ServerProcess:
    """API tokens on (mcp.json plugins allowed); per-request MCP servers off."""
    return start_server(models, "--api-token", TOKEN, token=TOKEN, env={"LMKUBE_HOME": str(home)})


def http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=server.headers, timeout=120)


def chat(server: ServerProcess, integrations: list, **extra) -> httpx.Response:
    body = {"model": MODEL, "input": "What is 2 + 3?", "integrations": integrations, "temperature": 0,
            "max_output_tokens": 200, "tool_choice": "required", **extra}
    with http(server) as client:
        return client.post("/api/v1/chat", json=body)


def ephemeral(url: str, **extra) -> dict:
    return {"type": "ephemeral_mcp", "server_label": "calc", "server_url": url, **extra}


def tool_calls(output: list[dict]) -> list[dict]:
    return [item for item in output if item["type"] == "tool_call"]


def test_ephemeral_mcp_tool_loop(remote_server: ServerProcess, mcp_url: str) -> None:
    response = chat(remote_server, [ephemeral(mcp_url)],
                    tool_choice={"type": "function", "function": {"name": "add"}})
    assert response.status_code == 200, response.text
    body = response.json()
    calls = tool_calls(body["output"])
    assert calls, body
    first = calls[0]
    assert first["tool"] == "add"
    jsonschema.validate(first["arguments"], ADD_SCHEMA)
    assert first["output"] == str(first["arguments"]["a"] + first["arguments"]["b"])  # computed by the MCP server
    assert first["provider_info"] == {"type": "ephemeral_mcp", "server_label": "calc"}
    assert body["output"].index(first) < len(body["output"]) - 1
    assert body["output"][-1]["type"] == "message" and body["output"][-1]["content"]
    assert body["stats"]["total_output_tokens"] > 0
    assert body["response_id"].startswith("resp_")
    # The stored conversation (tool call and result included) can be continued without integrations.
    with http(remote_server) as client:
        follow = client.post("/api/v1/chat", json={"model": MODEL, "input": "and 4 + 5?", "max_output_tokens": 5,
                                                   "previous_response_id": body["response_id"]})
        fresh = client.post("/api/v1/chat", json={"model": MODEL, "input": "and 4 + 5?", "max_output_tokens": 5})
    assert follow.status_code == 200, follow.text
    assert follow.json()["stats"]["input_tokens"] > fresh.json()["stats"]["input_tokens"] + 20


def test_allowed_tools_filter(remote_server: ServerProcess, mcp_url: str) -> None:
    response = chat(remote_server, [ephemeral(mcp_url, allowed_tools=["shout"])], input="Shout hello")
    assert response.status_code == 200, response.text
    first = tool_calls(response.json()["output"])[0]
    assert first["tool"] == "shout"
    assert isinstance(first["arguments"]["text"], str)
    assert first["output"] == first["arguments"]["text"].upper()
    # Nothing left after filtering: a forced call is a clear 400.
    response = chat(remote_server, [ephemeral(mcp_url, allowed_tools=["no_such_tool"])])
    assert response.status_code == 400
    assert "allowed_tools" in response.json()["error"]["message"]


def test_ephemeral_headers_reach_the_mcp_server(remote_server: ServerProcess, mcp_url: str) -> None:
    for headers, expected in (({"X-Test-Key": "open-sesame"}, "granted"), ({}, "denied")):
        response = chat(remote_server, [ephemeral(mcp_url, allowed_tools=["secret"], headers=headers)])
        assert response.status_code == 200, response.text
        assert tool_calls(response.json()["output"])[0]["output"] == expected


def test_ephemeral_refused_without_allow_remote_mcp(token_server: ServerProcess, mcp_url: str) -> None:
    response = chat(token_server, [ephemeral(mcp_url)])
    assert response.status_code == 403
    error = response.json()["error"]
    assert "--allow-remote-mcp" in error["message"] and error["param"] == "integrations"
    assert (error["type"], error["code"]) == ("invalid_request", "remote_mcp_disabled")


def test_plugin_from_mcp_json(token_server: ServerProcess) -> None:
    for integration in ({"type": "plugin", "id": "mcp/calc", "allowed_tools": ["secret"]},):
        response = chat(token_server, [integration])
        assert response.status_code == 200, response.text
        first = tool_calls(response.json()["output"])[0]
        assert first == {"type": "tool_call", "tool": "secret", "arguments": {}, "output": "granted",
                         "provider_info": {"type": "plugin", "plugin_id": "mcp/calc"}}
    # The string shorthand, with every tool of the server offered.
    response = chat(token_server, ["mcp/calc"], tool_choice={"type": "function", "function": {"name": "add"}})
    assert response.status_code == 200, response.text
    first = tool_calls(response.json()["output"])[0]
    assert first["tool"] == "add" and first["provider_info"] == {"type": "plugin", "plugin_id": "mcp/calc"}


def test_plugin_errors(token_server: ServerProcess, remote_server: ServerProcess) -> None:
    response = chat(remote_server, ["mcp/calc"])  # no API tokens on this server
    assert response.status_code == 403
    error = response.json()["error"]
    assert "--api-token" in error["message"]
    assert (error["type"], error["code"]) == ("invalid_request", "mcp_json_requires_auth")
    assert error["param"] == "integrations"
    response = chat(token_server, ["mcp/nope"])
    assert response.status_code == 400 and "not found" in response.json()["error"]["message"]
    response = chat(token_server, ["mcp/bad"])
    assert response.status_code == 400 and "neither a \"command\"" in response.json()["error"]["message"]
    response = chat(token_server, ["mcp/down"])
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "plugin_connection_error" and "mcp/down" in error["message"]


def test_unreachable_ephemeral_server(remote_server: ServerProcess) -> None:
    response = chat(remote_server, [ephemeral(f"http://127.0.0.1:{free_port()}/mcp")])
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "mcp_connection_error" and "calc" in error["message"]
    # The server is still fine afterwards.
    assert chat(remote_server, [], tool_choice=None, max_output_tokens=3).status_code == 200


def test_tool_choice_needs_integrations(remote_server: ServerProcess) -> None:
    response = chat(remote_server, [])
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"


def sse_events(server: ServerProcess, body: dict) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    with http(server) as client, client.stream("POST", "/api/v1/chat", json=body) as response:
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                events.append((name, data))
    return events


def test_streaming_tool_call_events(remote_server: ServerProcess, mcp_url: str) -> None:
    events = sse_events(remote_server, {
        "model": MODEL, "input": "What is 2 + 3?", "integrations": [ephemeral(mcp_url, allowed_tools=["add"])],
        "temperature": 0, "max_output_tokens": 200, "tool_choice": "required", "stream": True,
    })
    names = [name for name, _ in events]
    assert names[0] == "chat.start" and names[-1] == "chat.end"
    assert "error" not in names
    start, arguments, success = (names.index(n) for n in ("tool_call.start", "tool_call.arguments",
                                                          "tool_call.success"))
    assert start < arguments < success
    info = {"type": "ephemeral_mcp", "server_label": "calc"}
    assert events[start][1] == {"type": "tool_call.start", "tool": "add", "provider_info": info}
    jsonschema.validate(events[arguments][1]["arguments"], ADD_SCHEMA)
    done = events[success][1]
    assert done["output"] == str(done["arguments"]["a"] + done["arguments"]["b"])
    assert done["provider_info"] == info
    result = events[-1][1]["result"]
    assert tool_calls(result["output"])[0]["output"] == done["output"]
    assert result["output"][-1]["type"] == "message"


def test_parse_integrations(tmp_path: Path) -> None:
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"x": {"url": "http://h/mcp",
                                                                        "headers": {"A": "b"}}}}))
    parsed = parse_integrations(["mcp/x", {"type": "plugin", "id": "mcp/x", "allowed_tools": ["t"]},
                                 {"type": "ephemeral_mcp", "server_label": "e", "server_url": "https://e/mcp"}],
                                home=tmp_path, allow_remote=True, has_tokens=True)
    assert [(i.kind, i.label, i.url, i.headers, i.allowed_tools) for i in parsed] == [
        ("plugin", "mcp/x", "http://h/mcp", {"A": "b"}, None),
        ("plugin", "mcp/x", "http://h/mcp", {"A": "b"}, frozenset({"t"})),
        ("ephemeral_mcp", "e", "https://e/mcp", {}, None),
    ]
    assert parsed[0].provider_info == {"type": "plugin", "plugin_id": "mcp/x"}
    assert parsed[2].provider_info == {"type": "ephemeral_mcp", "server_label": "e"}
    for bad in ({"type": "ephemeral_mcp", "server_label": "e", "server_url": "file:///x"},
                {"type": "ephemeral_mcp", "server_label": "e", "server_url": "http://e", "allowed_tools": "t"},
                {"type": "nope"}, "not-mcp"):
        with pytest.raises(APIError) as info:
            parse_integrations([bad], home=tmp_path, allow_remote=True, has_tokens=True)
        assert info.value.status == 400 and info.value.param == "integrations"


def test_toolbox_calls_and_failures(mcp_url: str) -> None:
    async def main() -> None:
        [integration] = parse_integrations(
            [{"type": "ephemeral_mcp", "server_label": "calc", "server_url": mcp_url, "allowed_tools": ["add"]}],
            home=Path("/nonexistent"), allow_remote=True, has_tokens=False)
        toolbox = await open_toolbox([integration])
        try:
            assert list(toolbox.tools) == ["add"]
            [tool] = toolbox.openai_tools()
            assert tool["function"]["name"] == "add" and tool["function"]["parameters"]["required"] == ["a", "b"]
            ok = await toolbox.call(toolbox.tools["add"], {"a": 2, "b": 40})
            assert (ok.output, ok.error) == ("42", None)
            bad = await toolbox.call(toolbox.tools["add"], {"a": "x"})
            assert bad.error and "validation" in bad.error
        finally:
            await toolbox.close()
        closed = await toolbox.call(toolbox.tools["add"], {"a": 1, "b": 1})
        assert closed.error and "closed" in closed.error

    anyio.run(main)
