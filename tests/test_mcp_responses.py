"""MCP tools on /v1/responses with the official openai SDK: OpenAI's approval protocol
(`mcp_approval_request` output items, `mcp_approval_response` input items with `previous_response_id`),
`require_approval` filters, and mcp.json servers (a stdio one) named by `server_label`. The MCP servers
are real (tests/mcp_test_server.py over Streamable HTTP, tests/mcp_stdio_test_server.py over stdio); the
model is a random-weight Qwen2.5-template model whose first round is forced to call the tool."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import openai
import pytest
from support import ServerProcess

from lmkube.synthetic_gguf import write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
STDIO_SERVER = str(Path(__file__).parent / "mcp_stdio_test_server.py")
MODEL = "acme/qwen-tools"
TOKEN = "sk-lm-mcpresp:secretsecret"
ADD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"]}
FORCE_ADD = {"type": "mcp", "server_label": "calc", "name": "add"}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("mcp-responses-home")
    (home / "mcp.json").write_text(json.dumps({"mcpServers": {
        "local": {"command": sys.executable, "args": [STDIO_SERVER],
                  "env": {"MCP_TEST_PID_FILE": str(home / "local.pids")}},
        "crashy": {"command": sys.executable, "args": [STDIO_SERVER]},
        "broken": {"command": str(home / "no-such-mcp-server")},
    }}))
    return home


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory: pytest.TempPathFactory, home: Path) -> ServerProcess:
    models = tmp_path_factory.mktemp("mcp-responses-models")
    write_llama_model(models / "acme" / "qwen-tools" / "qwen-tools-F16.gguf", seed=5,
                      chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(),
                      extra_special_tokens=("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"))
    return start_server(models, "--api-token", TOKEN, "--allow-remote-mcp", token=TOKEN,
                        env={"LMKUBE_HOME": str(home)})


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def calc(mcp_url: str, **extra: object) -> dict:
    return {"type": "mcp", "server_label": "calc", "server_url": mcp_url, "allowed_tools": ["add"], **extra}


def ask(client: openai.OpenAI, tools: list, **extra: object):
    kwargs = {"model": MODEL, "input": "What is 2 + 3?", "tools": tools, "temperature": 0,
              "max_output_tokens": 200, "tool_choice": FORCE_ADD, **extra}
    return client.responses.create(**kwargs)


def approve(client: openai.OpenAI, previous, tools: list, request_id: str, approved: bool):
    return client.responses.create(
        model=MODEL, previous_response_id=previous.id, tools=tools, temperature=0, max_output_tokens=20,
        input=[{"type": "mcp_approval_response", "approval_request_id": request_id, "approve": approved}])


def test_approval_round_trip(client: openai.OpenAI, mcp_url: str) -> None:
    tools = [calc(mcp_url, require_approval="always")]
    first = ask(client, tools)
    # (The random model may write text after its call, in the same round: a message item after it.)
    assert [item.type for item in first.output][:2] == ["mcp_list_tools", "mcp_approval_request"]
    assert "mcp_call" not in [item.type for item in first.output]  # nothing ran
    request = first.output[1]
    assert request.id.startswith("mcpr_") and request.server_label == "calc" and request.name == "add"
    arguments = json.loads(request.arguments)
    jsonschema.validate(arguments, ADD_SCHEMA)

    second = approve(client, first, tools, request.id, True)
    calls = [item for item in second.output if item.type == "mcp_call"]
    assert calls, second.output
    call = calls[0]
    assert call.approval_request_id == request.id and call.name == "add" and call.server_label == "calc"
    assert json.loads(call.arguments) == arguments
    assert call.output == str(arguments["a"] + arguments["b"]) and call.status == "completed"  # the server's
    # The model answered with the result in its context: the whole conversation, then the tool's output.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.previous_response_id == first.id


def test_a_refused_approval_runs_nothing(client: openai.OpenAI, mcp_url: str) -> None:
    tools = [calc(mcp_url, require_approval="always")]
    first = ask(client, tools)
    request = first.output[1]
    assert request.type == "mcp_approval_request"
    second = approve(client, first, tools, request.id, False)
    assert not [item for item in second.output if item.type == "mcp_call"]
    assert second.status in ("completed", "incomplete") and second.usage.input_tokens > first.usage.input_tokens
    # The conversation goes on from there.
    third = client.responses.create(model=MODEL, previous_response_id=second.id, input="Thanks", max_output_tokens=3)
    assert third.status in ("completed", "incomplete")


def test_require_approval_filters(client: openai.OpenAI, mcp_url: str) -> None:
    ran = ask(client, [calc(mcp_url, require_approval={"never": {"tool_names": ["add"]}})])
    assert ran.output[1].type == "mcp_call" and ran.output[1].approval_request_id is None
    assert ran.output[1].output == str(sum(json.loads(ran.output[1].arguments).values()))
    asked = ask(client, [calc(mcp_url, require_approval={"always": {"tool_names": ["add"]}})])
    assert asked.output[1].type == "mcp_approval_request"
    default = ask(client, [calc(mcp_url)])  # left out: "never", as on LM Studio
    assert default.output[1].type == "mcp_call"


def test_approval_request_stream_events(client: openai.OpenAI, mcp_url: str) -> None:
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(ResponseStreamEvent)
    with client.responses.stream(model=MODEL, input="What is 2 + 3?", temperature=0, max_output_tokens=200,
                                 tools=[calc(mcp_url, require_approval="always")], tool_choice=FORCE_ADD) as stream:
        events = list(stream)
    for event in events:
        adapter.validate_python(event.model_dump())
    added = [e.item for e in events if e.type == "response.output_item.added"]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in added][:2] == [i.type for i in done][:2] == ["mcp_list_tools", "mcp_approval_request"]
    assert json.loads(done[1].arguments) == json.loads(events[-1].response.output[1].arguments)
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_approval_errors(client: openai.OpenAI, mcp_url: str) -> None:
    tools = [calc(mcp_url, require_approval="always")]
    answer = [{"type": "mcp_approval_response", "approval_request_id": "mcpr_nope", "approve": True}]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, tools=tools, input=answer)
    assert info.value.body["param"] == "previous_response_id"
    first = ask(client, tools)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, tools=tools, input=answer, previous_response_id=first.id)
    assert info.value.body["code"] == "approval_request_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, [calc(mcp_url, require_approval="sometimes")])
    assert info.value.body["param"] == "tools"


def test_an_mcp_json_stdio_server_by_label(client: openai.OpenAI, home: Path) -> None:
    tools = [{"type": "mcp", "server_label": "local", "allowed_tools": ["add", "whoami"]}]
    for _ in range(2):
        response = ask(client, tools, tool_choice={"type": "mcp", "server_label": "local", "name": "add"})
        listed, call = response.output[:2]
        assert listed.type == "mcp_list_tools" and listed.server_label == "local"
        assert sorted(t.name for t in listed.tools) == ["add", "whoami"]
        assert call.type == "mcp_call" and call.server_label == "local"
        assert call.output == str(sum(json.loads(call.arguments).values()))
    assert len((home / "local.pids").read_text().split()) == 1  # one process for both requests


def test_a_failed_call_is_an_mcp_call_with_an_error(client: openai.OpenAI) -> None:
    from openai.types.responses import Response

    response = ask(client, [{"type": "mcp", "server_label": "crashy", "allowed_tools": ["crash"]}],
                   tool_choice={"type": "mcp", "server_label": "crashy", "name": "crash"})
    call = response.output[1]
    assert call.type == "mcp_call" and call.status == "failed"
    assert call.error.type == "mcp_protocol_error" and "closed" in call.error.message
    Response.model_validate(response.model_dump())  # the error's shape is the SDK's McpToolCallError


def test_a_server_that_cannot_start_is_a_failed_listing(client: openai.OpenAI) -> None:
    from openai.types.responses import Response

    tools = [{"type": "mcp", "server_label": "broken"}, {"type": "mcp", "server_label": "local"}]
    with client.responses.stream(model=MODEL, input="Hi", tools=tools, max_output_tokens=5) as stream:
        events = list(stream)
    response = events[-1].response
    listings = {item.server_label: item for item in response.output if item.type == "mcp_list_tools"}
    assert listings["broken"].tools == [] and "no-such-mcp-server" in listings["broken"].error
    assert listings["local"].error is None and listings["local"].tools
    assert "response.mcp_list_tools.failed" in [event.type for event in events]
    Response.model_validate(response.model_dump())
    # Forced to call a tool that no server can take: an error before anything runs.
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, tools[:1], tool_choice={"type": "mcp", "server_label": "broken", "name": "add"})
    assert info.value.status_code == 502 and "no-such-mcp-server" in info.value.body["message"]
