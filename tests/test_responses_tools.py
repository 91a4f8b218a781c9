"""Tools on OpenAI's Responses API with the official openai SDK against a real server: function calls
round-tripped (stateless and stored), `tool_choice`, structured output (`text.format`), reasoning items, and
MCP tools run on the server."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from responses_support import (
    ADD_SCHEMA,
    REASONING_MODEL,
    SCHEMA,
    TOOL_MODEL,
    WEATHER,
    assert_openai_error,
    client,
    normalized,
    responses_server,
)
from support import CHAT_MODEL, ServerProcess

__all__ = ["client", "responses_server"]  # fixtures


# -- function calls, structured output, reasoning --------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_forced_function_call_round_trip(client: openai.OpenAI, stream: bool) -> None:
    kwargs = {"model": TOOL_MODEL, "input": "What's the weather?", "tools": [WEATHER], "temperature": 0,
              "tool_choice": {"type": "function", "name": "get-weather"}, "max_output_tokens": 200}
    if stream:
        with client.responses.stream(**kwargs) as events:
            names = [event.type for event in events]
            response = events.get_final_response()
        assert names.index("response.output_item.added") < names.index("response.function_call_arguments.delta") \
            < names.index("response.function_call_arguments.done") < names.index("response.output_item.done")
    else:
        response = client.responses.create(**kwargs)
    assert response.status == "completed"
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0] == response.output[-1]
    call = calls[0]
    assert call.name == "get-weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER["parameters"])
    assert response.tools[0].name == "get-weather" and response.tools[0].type == "function"

    # Stateless round trip: the output items go back as input with the call's output.
    output = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp_c": 21})}
    history = [{"role": "user", "content": "What's the weather?"},
               *[item.model_dump(exclude_none=True) for item in response.output], output]
    stateless = client.responses.create(model=TOOL_MODEL, input=history, tools=[WEATHER], temperature=0,
                                        max_output_tokens=4, store=False)
    # Stateful: only the call's output, after the stored response.
    stateful = client.responses.create(model=TOOL_MODEL, input=[output], tools=[WEATHER], temperature=0,
                                       max_output_tokens=4, previous_response_id=response.id, store=False)
    assert stateless.usage.input_tokens == stateful.usage.input_tokens > response.usage.input_tokens
    assert normalized(stateless.model_dump())["output"] == normalized(stateful.model_dump())["output"]
    # The call and its result are in the prompt: the same conversation through chat completions.
    expected = client.chat.completions.create(model=TOOL_MODEL, temperature=0, max_tokens=1, tools=[
        {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}],
        messages=[{"role": "user", "content": "What's the weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.call_id, "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": output["output"]}]).usage.prompt_tokens
    assert stateless.usage.input_tokens == expected


def test_required_tool_choice(client: openai.OpenAI) -> None:
    response = client.responses.create(model=TOOL_MODEL, input="Weather?", tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_output_tokens=200, store=False)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(c.name == "get-weather" for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    kwargs = {"model": TOOL_MODEL, "input": "Answer in JSON", "temperature": 0.7, "extra_body": {"seed": 3},
              "max_output_tokens": 300, "store": False,
              "text": {"format": {"type": "json_schema", "name": "out", "schema": SCHEMA, "strict": True}}}
    response = client.responses.create(**kwargs)
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert response.text.format.type == "json_schema" and response.text.format.schema_ == SCHEMA
    with client.responses.stream(**kwargs) as events:  # the same seed samples the same answer
        assert normalized(events.get_final_response().model_dump()) == normalized(response.model_dump())


def test_json_object_text_format(client: openai.OpenAI) -> None:
    response = client.responses.create(model=TOOL_MODEL, input="JSON please", temperature=0, max_output_tokens=400,
                                       text={"format": {"type": "json_object"}}, store=False)
    text = response.output_text
    if response.status == "completed":  # free JSON may run to the limit on a random model
        assert isinstance(json.loads(text), dict)
    assert text.lstrip().startswith("{")


def test_reasoning_item_and_stream(client: openai.OpenAI) -> None:
    kwargs = {"model": REASONING_MODEL, "input": "Think", "temperature": 0, "max_output_tokens": 12, "store": False}
    response = client.responses.create(**kwargs)
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert [part.type for part in reasoning.content] == ["reasoning_text"] and reasoning.content[0].text
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= 12
    events = list(client.responses.create(**kwargs, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == reasoning.content[0].text
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert done.text == deltas
    assert normalized(events[-1].response.model_dump()) == normalized(response.model_dump())
    # Reasoning items passed back as input are accepted: the same conversation as the stored one.
    follow = {"role": "user", "content": "Again"}
    stored = client.responses.create(**kwargs | {"store": True})
    stateful = client.responses.create(**kwargs | {"input": [follow], "previous_response_id": stored.id})
    stateless = client.responses.create(**kwargs | {"input": [
        {"role": "user", "content": "Think"}, *[item.model_dump(exclude_none=True) for item in stored.output],
        follow]})
    assert stateless.usage.input_tokens == stateful.usage.input_tokens > stored.usage.input_tokens
    # Effort "none" turns thinking off in the template.
    plain = client.responses.create(**kwargs | {"reasoning": {"effort": "none"}})
    assert [item.type for item in plain.output] == ["message"] and plain.output_text
    assert plain.reasoning.effort == "none"


# -- MCP tools -------------------------------------------------------------------------------------


def test_mcp_tool_runs_on_the_server(client: openai.OpenAI, mcp_url: str) -> None:
    tool = {"type": "mcp", "server_label": "calc", "server_url": mcp_url, "require_approval": "never",
            "allowed_tools": ["add"], "headers": {"X-Test-Key": "open-sesame"}}
    kwargs = {"model": TOOL_MODEL, "input": "What is 2 + 3?", "tools": [tool], "temperature": 0,
              "tool_choice": {"type": "mcp", "server_label": "calc", "name": "add"}, "max_output_tokens": 200,
              "store": False}
    with client.responses.stream(**kwargs) as events:
        seen = list(events)
    names = [event.type for event in seen]
    # After the tool result the random model writes until max_output_tokens: the stream ends incomplete.
    assert names[-1] in ("response.completed", "response.incomplete")
    response = seen[-1].response
    listed = response.output[0]
    assert listed.type == "mcp_list_tools" and listed.server_label == "calc"
    assert [t.name for t in listed.tools] == ["add"]
    call = response.output[1]
    assert call.type == "mcp_call" and call.server_label == "calc" and call.name == "add"
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, ADD_SCHEMA)
    assert call.output == str(arguments["a"] + arguments["b"]) and call.error is None  # the MCP server's answer
    assert call.status == "completed"
    assert response.output[-1].type in ("message", "mcp_call")
    assert "headers" not in response.tools[0].model_dump(exclude_none=True)
    for name in ("response.mcp_list_tools.completed", "response.mcp_call_arguments.done",
                 "response.mcp_call.in_progress", "response.mcp_call.completed"):
        assert name in names
    assert response.usage.input_tokens > 0


def test_mcp_tools_need_allow_remote_mcp(server: ServerProcess) -> None:
    with server.client() as http:
        response = http.post("/v1/responses", json={"model": CHAT_MODEL, "input": "Hi", "tools": [
            {"type": "mcp", "server_label": "calc", "server_url": "http://127.0.0.1:9/mcp"}]})
    error = assert_openai_error(response, 400, code="remote_mcp_disabled", param="tools")
    assert "--allow-remote-mcp" in error["message"]
