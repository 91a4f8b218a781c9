"""Tool calling, reasoning, structured output and presets through /v1/chat/completions (openai SDK)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from support import ServerProcess

from lmkube.synthetic_gguf import write_llama_model

TEMPLATES = Path(__file__).parent / "templates"

# (model key, template file, special tokens the real vocabulary has as single tokens)
TOOL_MODELS = {
    "acme/qwen-tools": ("Qwen-Qwen2.5-7B-Instruct", ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")),
    "acme/llama-tools": ("meta-llama-Llama-3.1-8B-Instruct",
                         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                          "<|python_tag|>", "<|eom_id|>")),
    "acme/mistral-tools": ("mistralai-Mistral-Nemo-Instruct-2407",
                           ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                            "[TOOL_RESULTS]", "[/TOOL_RESULTS]")),
}
REASONING_MODEL = "acme/r1-think"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get-weather",  # not a valid identifier for most templates: normalized and mapped back
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"$ref": "#/$defs/unit"},
            },
            "required": ["city", "days", "unit"],
            "$defs": {"unit": {"type": "string", "enum": ["c", "f"]}},
        },
    },
}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters at all
MESSAGES = [{"role": "user", "content": "What's the weather?"}]

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 100},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
        "name": {"type": "string", "maxLength": 8},
    },
    "required": ["answer", "ok", "tags", "name"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def chat_server(start_server, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("chat-models")
    for key, (template, specials) in TOOL_MODELS.items():
        publisher, repo = key.split("/")
        write_llama_model(models / publisher / repo / f"{repo}-F16.gguf", chat_template=(
            TEMPLATES / f"{template}.jinja").read_text(), extra_special_tokens=specials, seed=5)
    r1_template = (TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text()
    write_llama_model(models / "acme" / "r1-think" / "r1-think-F16.gguf", seed=6, chat_template=r1_template,
                      extra_special_tokens=("<think>", "</think>"))
    home = tmp_path_factory.mktemp("home")
    (home / "presets").mkdir()
    (home / "presets" / "json-bot.yaml").write_text(
        "system_prompt: Answer in JSON.\n"
        "sampling:\n"
        "  temperature: 0\n"
        "  max_tokens: 5\n"
    )
    (home / "presets" / "structured.json").write_text(json.dumps({
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}},
        "sampling": {"max_tokens": 200},
    }))
    return start_server(models, "--parallel", "2", env={"LMKUBE_HOME": str(home)})


@pytest.fixture(scope="module")
def client(chat_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{chat_server.base_url}/v1", api_key="x")


def validate_call(call: dict, tool: dict) -> None:
    assert call["type"] == "function"
    assert call["id"]
    assert call["function"]["name"] == tool["function"]["name"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"].get("parameters", {}))


@pytest.mark.parametrize("model", list(TOOL_MODELS))
def test_required_tool_choice_forces_a_valid_call(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=200,
        parallel_tool_calls=False,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    validate_call(choice.message.tool_calls[0].model_dump(), WEATHER)


@pytest.mark.parametrize("model", list(TOOL_MODELS))
def test_named_tool_choice_streams_id_and_name_first(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=[PING, WEATHER], temperature=0, max_tokens=200, stream=True,
        tool_choice={"type": "function", "function": {"name": "get-weather"}}, parallel_tool_calls=False,
    )
    pieces = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    first = pieces[0][0]
    assert first.index == 0 and first.id and first.function.name == "get-weather"
    assert len(pieces) > 1  # arguments arrive progressively, after the name
    arguments = "".join(p.function.arguments or "" for chunk in pieces for p in chunk)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert all(p.index == 0 for chunk in pieces for p in chunk)


def test_tool_without_parameters_can_be_forced(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="acme/qwen-tools", messages=MESSAGES, tools=[PING], tool_choice="required", temperature=0,
        max_tokens=60, parallel_tool_calls=False,
    )
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {}


def test_parallel_calls_get_distinct_indexes(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="acme/qwen-tools", messages=MESSAGES, tools=[WEATHER, PING], tool_choice="required",
        temperature=0, max_tokens=300,
    )
    calls = completion.choices[0].message.tool_calls
    assert 1 <= len(calls) <= 2
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        validate_call(call.model_dump(), WEATHER if call.function.name == "get-weather" else PING)


def test_tool_call_history_round_trips_through_each_template(client: openai.OpenAI) -> None:
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
            "name": "get-weather", "arguments": '{"city": "Oslo", "days": 2, "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 3}'},
    ]
    for model in TOOL_MODELS:
        completion = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=3)
        assert completion.usage.prompt_tokens > 30  # tool definitions and results are in the prompt


def test_tool_choice_none_keeps_tools_out_of_the_prompt(client: openai.OpenAI) -> None:
    with_tools = client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, tools=[WEATHER],
                                                max_tokens=1)
    none = client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, tools=[WEATHER],
                                          tool_choice="none", max_tokens=1)
    plain = client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, max_tokens=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < with_tools.usage.prompt_tokens


def test_bad_tool_choices_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, tool_choice="required")


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client: openai.OpenAI, stream: bool) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA, "strict": True}}
    kwargs = {"model": "acme/qwen-tools", "messages": MESSAGES, "response_format": response_format,
              "max_tokens": 300, "temperature": 0.7, "seed": 3}
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    else:
        completion = client.chat.completions.create(**kwargs)
        assert completion.choices[0].finish_reason == "stop"
        text = completion.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


def test_response_format_types(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, max_tokens=3,
                                           response_format={"type": "text"})
    assert plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match=r"'response_format\.type' must be 'json_schema' or 'text'"):
        client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES,
                                       response_format={"type": "json_object"})


def test_reasoning_is_separated_from_content(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=REASONING_MODEL, messages=MESSAGES, max_tokens=12,
                                                temperature=0)
    message = completion.choices[0].message.model_dump()
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"]
    assert message["content"] == ""  # the think block never closed: everything was reasoning
    assert 0 < completion.usage.completion_tokens_details.reasoning_tokens <= 12
    chunks = [c for c in client.chat.completions.create(model=REASONING_MODEL, messages=MESSAGES, max_tokens=12,
                                                         temperature=0, stream=True) if c.choices]
    deltas = [c.choices[0].delta.model_dump() for c in chunks]
    streamed = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert streamed == message["reasoning_content"]
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert not any(d.get("content") for d in deltas)


def test_reasoning_effort_none_reaches_the_template(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=REASONING_MODEL, messages=MESSAGES, max_tokens=8,
                                                temperature=0, reasoning_effort="none")
    message = completion.choices[0].message.model_dump()
    assert message["content"] and not message.get("reasoning_content")


def test_preset_fills_defaults_and_request_fields_win(client: openai.OpenAI) -> None:
    preset = client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, extra_body={
        "preset": "json-bot"})
    explicit = client.chat.completions.create(
        model="acme/qwen-tools", messages=[{"role": "system", "content": "Answer in JSON."}, *MESSAGES], max_tokens=5,
        temperature=0,
    )
    assert preset.usage.completion_tokens == 5  # the preset's max_tokens
    assert preset.usage.prompt_tokens == explicit.usage.prompt_tokens  # its system prompt was used
    assert preset.choices[0].message.content == explicit.choices[0].message.content  # and temperature 0
    overridden = client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, max_tokens=2,
                                                extra_body={"preset": "@local:json-bot"})
    assert overridden.usage.completion_tokens == 2
    structured = client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, temperature=0,
                                                extra_body={"preset": "structured"})
    jsonschema.validate(json.loads(structured.choices[0].message.content), SCHEMA)
    with pytest.raises(openai.BadRequestError, match="json-bot"):  # lists the presets that exist
        client.chat.completions.create(model="acme/qwen-tools", messages=MESSAGES, extra_body={"preset": "nope"})


def test_native_model_list_reports_reasoning_capability(chat_server: ServerProcess) -> None:
    models = {m["key"]: m for m in httpx.get(f"{chat_server.base_url}/api/v1/models").json()["models"]}
    assert models[REASONING_MODEL]["capabilities"]["reasoning"] == {"allowed_options": ["off", "on"],
                                                                     "default": "on"}
    assert "reasoning" not in models["acme/qwen-tools"]["capabilities"]
    assert models["acme/qwen-tools"]["capabilities"]["trained_for_tool_use"] is True
