"""OpenAI's Responses API (`POST /v1/responses`) with the official openai SDK against a real server:
the Response object, streaming through the SDK's helpers, stored conversations shared with
/api/v1/chat, function calls round-tripped, structured output, reasoning, MCP tools and errors."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from support import CHAT_MODEL, ServerProcess

from lmkube.synthetic_gguf import write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
TOOL_MODEL = "acme/qwen-tools"
REASONING_MODEL = "acme/r1-think"
EOS_MODEL = "acme/eos-chat"  # ends on its own: responses that complete without a grammar
LOAD_MODEL = "acme/codex-chat"  # only the Codex-style load test uses it
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{48}")

WEATHER = {
    "type": "function",
    "name": "get-weather",  # normalized for the model and mapped back
    "description": "Current weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
    "strict": True,
}
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 100}, "ok": {"type": "boolean"},
                   "name": {"type": "string", "maxLength": 8}},
    "required": ["answer", "ok", "name"],
    "additionalProperties": False,
}
REMOTE_REF = {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}  # never fetched
ADD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"]}


@pytest.fixture(scope="module")
def responses_server(start_server, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("responses-models")
    write_llama_model(models / "acme" / "tiny-chat" / "tiny-chat-F16.gguf", seed=1, name="Tiny Chat")
    write_llama_model(models / "acme" / "qwen-tools" / "qwen-tools-F16.gguf", seed=5,
                      chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(),
                      extra_special_tokens=("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"))
    write_llama_model(models / "acme" / "r1-think" / "r1-think-F16.gguf", seed=6,
                      chat_template=(TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text(),
                      extra_special_tokens=("<think>", "</think>"))
    write_llama_model(models / "acme" / "eos-chat" / "eos-chat-F16.gguf", seed=4, emit_eos=True, eos_gain=2.0)
    write_llama_model(models / "acme" / "codex-chat" / "codex-chat-F16.gguf", seed=7)
    return start_server(models, "--no-auto-evict", "--allow-remote-mcp")


@pytest.fixture(scope="module")
def client(responses_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{responses_server.base_url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def http(responses_server: ServerProcess) -> Iterator[httpx.Client]:
    with responses_server.client() as client:
        yield client


def normalized(response: dict[str, Any]) -> dict[str, Any]:
    """A response without what differs between two runs of one request: ids, timestamps, the KV-cache
    hits, and the `parsed` fields the SDK's stream helper adds (None here)."""
    response = json.loads(json.dumps(response))
    for key in ("id", "created_at", "completed_at"):
        response.pop(key, None)
    if response.get("usage"):
        response["usage"]["input_tokens_details"].pop("cached_tokens")
    for item in response["output"]:
        item.pop("id", None)
        item.pop("call_id", None)
        for part in item.get("content") or []:
            assert part.pop("parsed", None) is None
    return response


def assert_openai_error(response: httpx.Response, status: int, *, code: str | None = None,
                        param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


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


# -- stored conversations --------------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, http: httpx.Client) -> None:
    first = client.responses.create(model=CHAT_MODEL, input="My name is Ada.", temperature=0, max_output_tokens=6)
    second = client.responses.create(model=CHAT_MODEL, input="What is my name?", temperature=0, max_output_tokens=6,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    fresh = client.responses.create(model=CHAT_MODEL, input="What is my name?", temperature=0, max_output_tokens=6,
                                    store=False)
    # The second turn's prompt holds the first turn (its input and its output) ...
    expected = client.chat.completions.create(model=CHAT_MODEL, temperature=0, max_tokens=1, messages=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}]).usage.prompt_tokens
    assert second.usage.input_tokens == expected > fresh.usage.input_tokens + first.usage.output_tokens
    # ... and reuses the KV cache of the first.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    # LM Studio's /api/v1/chat continues the same stored conversation, and the other way round.
    native = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "What is my name?", "temperature": 0,
                                             "max_output_tokens": 6, "previous_response_id": first.id}).json()
    assert native["stats"]["input_tokens"] == second.usage.input_tokens
    assert "".join(item["content"] for item in native["output"]) == second.output_text
    third = client.responses.create(model=CHAT_MODEL, input="Thanks", temperature=0, max_output_tokens=3,
                                    previous_response_id=native["response_id"])
    assert third.usage.input_tokens > native["stats"]["input_tokens"] + native["stats"]["total_output_tokens"]


def test_store_false_keeps_nothing(client: openai.OpenAI, responses_server: ServerProcess,
                                   http: httpx.Client) -> None:
    stored_files = responses_server.log_path.parent / "conversations"  # the server's LMKUBE_HOME
    before = set(stored_files.glob("*.json")) if stored_files.exists() else set()
    for stream in (False, True):
        if stream:
            events = list(client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2, store=False,
                                                  stream=True))
            unstored = events[-1].response
        else:
            unstored = client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2, store=False)
        assert RESPONSE_ID.fullmatch(unstored.id) and unstored.store is False
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2,
                                    previous_response_id=unstored.id)
        assert caught.value.code == "previous_response_not_found"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.input_items.list(unstored.id)
        assert_openai_error(http.get(f"/v1/responses/{unstored.id}"), 404, code="not_found")
    assert (set(stored_files.glob("*.json")) if stored_files.exists() else set()) == before


def test_unknown_previous_response_id(client: openai.OpenAI, http: httpx.Client) -> None:
    for unknown in ("resp_" + "0" * 48, "resp_nope", "../../etc/passwd"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model=CHAT_MODEL, input="Hi", previous_response_id=unknown)
        assert caught.value.code == "previous_response_not_found"
        assert caught.value.param == "previous_response_id"
    response = http.post("/v1/responses", json={"model": CHAT_MODEL, "input": "Hi",
                                                "previous_response_id": "resp_" + "1" * 48})
    assert_openai_error(response, 404, code="previous_response_not_found", param="previous_response_id")


@pytest.mark.parametrize("stream", [False, True])
def test_stored_response_retrieve_and_delete(client: openai.OpenAI, http: httpx.Client, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": CHAT_MODEL, "input": "Remember me", "temperature": 0,
                              "max_output_tokens": 5, "metadata": {"k": "v"}}
    if stream:
        created = list(client.responses.create(**kwargs, stream=True))[-1].response
    else:
        created = client.responses.create(**kwargs)
    retrieved = client.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump()
    assert retrieved.status == created.status == "incomplete" and retrieved.output_text == created.output_text
    assert retrieved.usage is not None and retrieved.usage.input_tokens == created.usage.input_tokens
    # A continuation of it, then the delete: OpenAI's deleted object, and it is gone everywhere.
    child = client.responses.create(model=CHAT_MODEL, input="Again", max_output_tokens=2,
                                    previous_response_id=created.id)
    assert client.responses.retrieve(child.id).previous_response_id == created.id
    deleted = http.delete(f"/v1/responses/{created.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": created.id, "object": "response.deleted",
                                                             "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2, previous_response_id=created.id)
    assert caught.value.code == "previous_response_not_found"
    client.responses.delete(child.id)  # the SDK's own delete call
    assert_openai_error(http.get(f"/v1/responses/{child.id}"), 404, code="not_found")
    for bad in ("resp_nope", "nothing-here"):
        assert_openai_error(http.get(f"/v1/responses/{bad}"), 404)
        assert_openai_error(http.delete(f"/v1/responses/{bad}"), 404)


def test_input_items_pages_like_openai(client: openai.OpenAI, http: httpx.Client) -> None:
    items: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second"}],
         "id": "msg_client_given"},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"},
        {"role": "user", "content": "third"},
    ]
    created = client.responses.create(model=CHAT_MODEL, input=items, max_output_tokens=2, temperature=0)
    # Default order is desc (newest first), limit 20: all seven items, typed by the SDK.
    listed = client.responses.input_items.list(created.id)
    everything = listed.data
    assert [item.type for item in everything] == ["message", "function_call_output", "function_call", "message",
                                                  "message", "message", "message"]
    assert everything[0].content[0].text == "third" and everything[-1].role == "developer"
    assert everything[3].id == "msg_client_given" and everything[3].content[0].text == "second"
    assert everything[4].role == "assistant" and everything[4].content[0].type == "output_text"
    assert everything[1].output == "42" and everything[2].name == "lookup"
    ids = [item.id for item in everything]
    assert len(set(ids)) == 7 and all(ids)
    raw = http.get(f"/v1/responses/{created.id}/input_items").json()
    assert raw["object"] == "list" and raw["first_id"] == ids[0] and raw["last_id"] == ids[-1]
    assert raw["has_more"] is False and [item["id"] for item in raw["data"]] == ids
    # Pages of 3, ascending: the SDK follows `after` through them.
    ascending = client.responses.input_items.list(created.id, order="asc", limit=3)
    assert [item.id for item in ascending.data] == ids[::-1][:3] and ascending.has_more
    assert [item.id for page in ascending.iter_pages() for item in page.data] == ids[::-1]
    after = http.get(f"/v1/responses/{created.id}/input_items",
                     params={"order": "asc", "limit": 3, "after": ids[::-1][5]}).json()
    assert [item["id"] for item in after["data"]] == [ids[0]] and after["has_more"] is False
    before = http.get(f"/v1/responses/{created.id}/input_items", params={"limit": 2, "before": ids[4]}).json()
    assert [item["id"] for item in before["data"]] == ids[2:4] and before["has_more"] is True
    assert before["first_id"] == ids[2] and before["last_id"] == ids[3]
    included = client.responses.input_items.list(created.id, include=["message.input_image.image_url"], limit=1)
    assert [item.id for item in included.data] == ids[:1]
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order"),
                          ({"after": "msg_unknown"}, "after")):
        assert_openai_error(http.get(f"/v1/responses/{created.id}/input_items", params=params), 400, param=param)
    # A string input is one user message.
    single = client.responses.create(model=CHAT_MODEL, input="just this", max_output_tokens=1)
    listed_single = client.responses.input_items.list(single.id).data
    assert len(listed_single) == 1 and listed_single[0].role == "user"
    assert listed_single[0].content[0].type == "input_text" and listed_single[0].content[0].text == "just this"


def test_responses_stored_by_native_chat_can_be_retrieved(client: openai.OpenAI, http: httpx.Client) -> None:
    native = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "Hello there", "system_prompt": "Be kind",
                                             "temperature": 0, "max_output_tokens": 4}).json()
    retrieved = client.responses.retrieve(native["response_id"])
    assert retrieved.id == native["response_id"] and retrieved.status == "completed"
    assert retrieved.output_text == "".join(item["content"] for item in native["output"] if item["type"] == "message")
    items = client.responses.input_items.list(native["response_id"], order="asc").data
    assert [(item.role, item.content[0].text) for item in items] == [("system", "Be kind"), ("user", "Hello there")]


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
