"""OpenAI's Responses API (`POST /v1/responses`) with the official openai SDK against a real server: the
Response object, streaming through the SDK's helpers, errors, and every streamed event against the SDK's own
types. Stored responses: tests/test_responses_stored.py; tools, structured output and reasoning:
tests/test_responses_tools.py."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from responses_support import (
    EOS_MODEL,
    LOAD_MODEL,
    REASONING_MODEL,
    REMOTE_REF,
    RESPONSE_ID,
    TOOL_MODEL,
    WEATHER,
    assert_openai_error,
    client,
    http,
    normalized,
    responses_server,
)
from support import CHAT_MODEL, ServerProcess

__all__ = ["client", "http", "responses_server"]  # fixtures


# -- the Response object ---------------------------------------------------------------------------


def test_string_input_response_shape(client: openai.OpenAI) -> None:
    response = client.responses.create(model=CHAT_MODEL, input="Hello there", max_output_tokens=6, temperature=0,
                                       metadata={"k": "v"}, store=False)
    assert RESPONSE_ID.fullmatch(response.id)
    assert response.object == "response" and response.model == CHAT_MODEL
    assert response.created_at > 0 and response.error is None
    # The random model never samples EOS: the answer is cut by max_output_tokens.
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert len(response.output) == 1
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"]
    assert message.content[0].annotations == []
    assert response.output_text == message.content[0].text and response.output_text
    usage = response.usage
    assert usage.output_tokens == 6 and usage.output_tokens_details.reasoning_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and usage.input_tokens > 0
    assert usage.input_tokens_details.cached_tokens >= 0
    # The request's settings are echoed back.
    assert response.max_output_tokens == 6 and response.temperature == 0 and response.store is False
    assert response.metadata == {"k": "v"} and response.tool_choice == "auto" and response.tools == []
    assert response.parallel_tool_calls is True and response.text.format.type == "text"


def test_items_and_instructions_match_chat_completions(client: openai.OpenAI) -> None:
    items = [
        {"role": "user", "content": "Hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "How "},
                                                         {"type": "input_text", "text": "are you?"}]},
    ]
    response = client.responses.create(model=CHAT_MODEL, input=items, instructions="Be brief.", temperature=0,
                                       max_output_tokens=8, store=False)
    completion = client.chat.completions.create(
        model=CHAT_MODEL, temperature=0, max_tokens=8,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}])
    assert response.usage.input_tokens == completion.usage.prompt_tokens
    assert response.output_text == completion.choices[0].message.content
    assert response.instructions == "Be brief."
    # A developer message is the system role.
    developer = client.responses.create(model=CHAT_MODEL, temperature=0, max_output_tokens=8, store=False,
                                        input=[{"role": "developer", "content": "Be brief."}, *items])
    assert developer.usage.input_tokens == response.usage.input_tokens
    assert developer.output_text == response.output_text


def test_completed_response_and_stream_accumulate_to_the_same_object(client: openai.OpenAI) -> None:
    kwargs = {"model": EOS_MODEL, "input": "Tell me a story", "temperature": 0, "max_output_tokens": 200,
              "store": False}
    plain = client.responses.create(**kwargs)
    assert plain.status == "completed" and plain.incomplete_details is None
    assert plain.output[-1].status == "completed" and plain.usage.output_tokens < 200
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert normalized(final.model_dump()) == normalized(plain.model_dump())
    names = [event.type for event in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    expected = ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert names[2:5] == expected
    assert names[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert set(names[5:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[0].response.id == final.id
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.output_text == plain.output_text
    done = next(event for event in events if event.type == "response.output_text.done")
    assert done.text == final.output_text and done.item_id == final.output[0].id


def test_incomplete_stream_ends_with_response_incomplete(client: openai.OpenAI) -> None:
    plain = client.responses.create(model=CHAT_MODEL, input="Count", max_output_tokens=5, temperature=0, store=False)
    events = list(client.responses.create(model=CHAT_MODEL, input="Count", max_output_tokens=5, temperature=0,
                                          store=False, stream=True))
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert normalized(last.response.model_dump()) == normalized(plain.model_dump())
    assert [event.sequence_number for event in events] == list(range(len(events)))


def test_codex_style_load_request(responses_server: ServerProcess, http: httpx.Client) -> None:
    def loaded() -> list[Any]:
        models = http.get("/api/v1/models").json()["models"]
        return next(m for m in models if m["key"] == LOAD_MODEL)["loaded_instances"]

    assert loaded() == []
    response = http.post("/v1/responses", json={"model": LOAD_MODEL, "input": "", "max_output_tokens": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "incomplete" and body["usage"]["output_tokens"] == 1
    assert [item["type"] for item in body["output"]] == ["message"]
    assert loaded()

# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": "image_generation_call"}]}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": "Hi", "tools": [{"type": "namespace", "tools": []}]}, "tools[0].name"),
    ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "Hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "Hi", "temperature": 3}, "temperature"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": REMOTE_REF}}}, "text.format"),
])
def test_bad_input_is_a_400_in_openai_shape(http: httpx.Client, body: dict[str, Any], param: str | None) -> None:
    response = http.post("/v1/responses", json={"model": TOOL_MODEL, **body})
    error = assert_openai_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="acme/no-such-model", input="Hi")
    assert caught.value.code == "model_not_found"


def test_stream_disconnect_frees_the_slot(responses_server: ServerProcess, http: httpx.Client) -> None:
    with http.stream("POST", "/v1/responses", json={"model": CHAT_MODEL, "input": "Go on", "stream": True,
                                                    "max_output_tokens": 100000}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if "response.output_text.delta" in line:
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = [i for i in http.get("/api/v1/instances").json()["instances"] if i["active"] or i["queued"]]
        if not busy:
            break
        time.sleep(0.05)
    assert not busy


# -- every event validates against the SDK's own types ---------------------------------------------


def raw_events(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = []
    for frame in text.strip("\n").split("\n\n"):
        name_line, data_line = frame.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {data['type']}"
        events.append(data)
    return events


def test_streamed_events_validate_against_the_sdk_types(http: httpx.Client, mcp_url: str) -> None:
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(ResponseStreamEvent)
    bodies = [
        {"model": REASONING_MODEL, "input": "Think", "max_output_tokens": 8},
        {"model": TOOL_MODEL, "input": "Weather?", "tools": [WEATHER], "tool_choice": "required",
         "max_output_tokens": 200},
        {"model": TOOL_MODEL, "input": "2 + 3?", "max_output_tokens": 20, "tool_choice": "required",
         "tools": [{"type": "mcp", "server_label": "calc", "server_url": mcp_url, "allowed_tools": ["add"],
                    "require_approval": "never"}]},
    ]
    for body in bodies:
        events = raw_events(http, {**body, "temperature": 0, "store": False})
        for event in events:
            adapter.validate_python(event)  # strict: every required field present with the right type
        Response.model_validate(events[-1]["response"])
        assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_failure_events_validate_against_the_sdk_types() -> None:
    from lmkube.server.api.openai.responses_events import EventEncoder, ResponseBuilder
    from lmkube.server.chat.deltas import ChatDelta
    from openai.types.responses import ResponseErrorEvent, ResponseFailedEvent

    builder = ResponseBuilder({"id": "resp_" + "a" * 48, "object": "response", "created_at": 1, "status":
                               "in_progress", "model": "m", "output": [], "parallel_tool_calls": True,
                               "tool_choice": "auto", "tools": [], "error": None})
    events = builder.start() + builder.feed(ChatDelta(content="partial")) + builder.fail("Generation failed: boom",
                                                                                         "server_error")
    frames = EventEncoder().encode(events).decode().strip("\n").split("\n\n")
    data = [json.loads(frame.split("\n")[1].removeprefix("data: ")) for frame in frames]
    error = ResponseErrorEvent.model_validate(data[-2])
    assert error.message == "Generation failed: boom" and error.code == "server_error"
    failed = ResponseFailedEvent.model_validate(data[-1])
    assert failed.response.status == "failed" and failed.response.error.message == error.message
    assert failed.response.output[0].status == "incomplete" and failed.response.output[0].content[0].text == "partial"
