"""The real-model tier: SmolLM2-135M-Instruct (a real instruct model, greedy) through a real server and the
official SDKs. Random weights show that every endpoint works; this shows that what they say is right: the
template path matches llama-cpp-python's own, turns end naturally, forced tool calls and structured output
are valid on natural prompts, stored conversations keep their context and prefix caching reports its hits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import llama_cpp
import llama_cpp.llama
import openai
import pytest
from lmkube.server.engine.llama_lib import default_model_params
from support import REAL_MODEL, ServerProcess

pytestmark = pytest.mark.real_model

GREEDY = {"temperature": 0}
SEA = "Write one sentence about the sea."
WEATHER_PROMPT = "What is the weather in Paris for 3 days?"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                  "required": ["city", "days"]}
WEATHER_DESCRIPTION = "Get the weather forecast for a city"
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                 "required": ["name", "age"], "additionalProperties": False}
# Greedy SmolLM2 names the city back on the second turn only when it sees the first (checked both ways).
INTRODUCTION, QUESTION, REMEMBERED = "Hi! I am Tom and I live in Berlin.", "Which city do I live in?", "berlin"
LONG = 400  # enough for every natural answer here to end on its own


@pytest.fixture(scope="module")
def client(real_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{real_server.base_url}/v1", api_key="lm-studio", timeout=300)


@pytest.fixture(scope="module")
def claude(real_server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=real_server.base_url, api_key="lm-studio", timeout=300)


@pytest.fixture(scope="module")
def http(real_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=real_server.base_url, timeout=300) as session:
        yield session


@pytest.fixture(scope="module")
def reference(real_model_file: Path) -> Iterator[llama_cpp.Llama]:
    """llama-cpp-python's own Llama on the same file, with the server's safe model parameters (see
    default_model_params: AMX builds segfault otherwise) and, like the server (llama.cpp's "auto" on CPU),
    flash attention: it sums in another order, and greedy picks between near-ties follow the sums."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", default_model_params)
        model = llama_cpp.Llama(str(real_model_file), n_ctx=2048, n_threads=1, n_threads_batch=1,
                                 flash_attn=True, verbose=False)
    yield model
    model.close()


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": SEA}],  # the template's own default system prompt
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Name three colours."}],
], ids=["default-system", "system", "multi-turn"])
def test_greedy_chat_matches_llama_cpp_python(client: openai.OpenAI, reference: llama_cpp.Llama,
                                              messages: list[dict[str, str]]) -> None:
    expected: Any = reference.create_chat_completion(messages=messages, max_tokens=64, **GREEDY)
    completion = client.chat.completions.create(model=REAL_MODEL, messages=messages, max_tokens=64, **GREEDY)
    assert completion.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert completion.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]


PREFILL = "The sea is"


@pytest.fixture(scope="module")
def prefill_reference(reference: llama_cpp.Llama) -> dict[str, Any]:
    """llama-cpp-python's greedy continuation of the conversation rendered with the assistant turn open and
    the prefill after it (its own Jinja formatter on the model's own template)."""
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=reference.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>")
    prompt = formatter(messages=[{"role": "user", "content": SEA}]).prompt + PREFILL
    completion: Any = reference.create_completion(prompt, max_tokens=24, **GREEDY)
    return completion


def test_prefill_chat_completions_matches_llama_cpp_python(client: openai.OpenAI,
                                                           prefill_reference: dict[str, Any]) -> None:
    messages: list[Any] = [{"role": "user", "content": SEA}, {"role": "assistant", "content": PREFILL}]
    completion = client.chat.completions.create(model=REAL_MODEL, messages=messages, max_tokens=24, **GREEDY)
    text = completion.choices[0].message.content
    assert text == prefill_reference["choices"][0]["text"]
    assert text and not text.startswith(PREFILL) and "<|im" not in text  # the continuation only, in the turn
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prefill_reference["usage"]["prompt_tokens"]


def test_prefill_anthropic_matches_llama_cpp_python(claude: anthropic.Anthropic,
                                                    prefill_reference: dict[str, Any]) -> None:
    message = claude.messages.create(model=REAL_MODEL, max_tokens=24, extra_body=GREEDY, messages=[
        {"role": "user", "content": SEA}, {"role": "assistant", "content": PREFILL}])
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == prefill_reference["choices"][0]["text"]
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == prefill_reference["usage"]["prompt_tokens"]


def test_natural_end_of_turn_chat_completions(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": SEA}]
    completion = client.chat.completions.create(model=REAL_MODEL, messages=messages, max_tokens=LONG, **GREEDY)
    text = completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert text and "sea" in text.lower() and "<|im_end|>" not in text
    assert completion.usage is not None and completion.usage.completion_tokens < LONG

    chunks = list(client.chat.completions.create(model=REAL_MODEL, messages=messages, max_tokens=LONG, stream=True,
                                                 **GREEDY))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_natural_end_of_turn_responses(client: openai.OpenAI) -> None:
    response = client.responses.create(model=REAL_MODEL, input=SEA, max_output_tokens=LONG, store=False, **GREEDY)
    assert response.status == "completed" and response.incomplete_details is None
    assert "sea" in response.output_text.lower()

    events = list(client.responses.create(model=REAL_MODEL, input=SEA, max_output_tokens=LONG, store=False,
                                          stream=True, **GREEDY))
    assert events[-1].type == "response.completed"
    assert events[-1].response.status == "completed"
    assert events[-1].response.output_text == response.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text


def test_natural_end_of_turn_anthropic(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": REAL_MODEL, "max_tokens": LONG, "extra_body": GREEDY,
                              "messages": [{"role": "user", "content": SEA}]}
    message = claude.messages.create(**kwargs)
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    text = "".join(block.text for block in message.content if block.type == "text")
    assert "sea" in text.lower()

    with claude.messages.stream(**kwargs) as stream:
        deltas = [e.delta.text for e in stream if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn"
    assert "".join(deltas) == text


def test_natural_end_of_turn_native_chat(http: httpx.Client) -> None:
    body = {"model": REAL_MODEL, "input": SEA, "max_output_tokens": LONG, "store": False, **GREEDY}
    response = http.post("/api/v1/chat", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    [message] = result["output"]
    assert message["type"] == "message" and "sea" in message["content"].lower()
    assert result["stats"]["total_output_tokens"] < LONG  # ended on its own, not at the limit

    events = native_events(http, body)
    names = [name for name, _ in events]
    assert names[0] == "chat.start" and names[-1] == "chat.end" and "error" not in names
    assert "".join(data["content"] for name, data in events if name == "message.delta") == message["content"]
    assert events[-1][1]["result"]["output"] == result["output"]


def native_events(http: httpx.Client, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    events = []
    with http.stream("POST", "/api/v1/chat", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_forced_tool_call_chat_completions(client: openai.OpenAI) -> None:
    tool = {"type": "function",
            "function": {"name": "get_weather", "description": WEATHER_DESCRIPTION, "parameters": WEATHER_SCHEMA}}
    completion = client.chat.completions.create(
        model=REAL_MODEL, messages=[{"role": "user", "content": WEATHER_PROMPT}], tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=LONG, **GREEDY)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert_weather_arguments(json.loads(call.function.arguments))


def test_forced_tool_call_anthropic(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=REAL_MODEL, max_tokens=LONG, extra_body=GREEDY, messages=[{"role": "user", "content": WEATHER_PROMPT}],
        tools=[{"name": "get_weather", "description": WEATHER_DESCRIPTION, "input_schema": WEATHER_SCHEMA}],
        tool_choice={"type": "tool", "name": "get_weather"})
    assert message.stop_reason == "tool_use"
    [use] = [block for block in message.content if block.type == "tool_use"]
    assert use.name == "get_weather"
    assert_weather_arguments(use.input)


def test_forced_tool_call_responses(client: openai.OpenAI) -> None:
    tool: Any = {"type": "function", "name": "get_weather", "description": WEATHER_DESCRIPTION,
                 "parameters": WEATHER_SCHEMA}
    response = client.responses.create(model=REAL_MODEL, input=WEATHER_PROMPT, tools=[tool], store=False,
                                       tool_choice={"type": "function", "name": "get_weather"},
                                       max_output_tokens=LONG, **GREEDY)
    assert response.status == "completed"
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather"
    assert_weather_arguments(json.loads(call.arguments))


def assert_weather_arguments(arguments: Any) -> None:
    jsonschema.validate(arguments, WEATHER_SCHEMA)
    assert "paris" in arguments["city"].lower()


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    prompt = "Alice is 30 years old. Give her name and age as JSON."
    completion = client.chat.completions.create(
        model=REAL_MODEL, messages=[{"role": "user", "content": prompt}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}},
        max_tokens=LONG, **GREEDY)
    assert completion.choices[0].finish_reason == "stop"
    person = json.loads(completion.choices[0].message.content or "")
    jsonschema.validate(person, PERSON_SCHEMA)
    assert person["name"] == "Alice"


def test_responses_chain_keeps_context(client: openai.OpenAI) -> None:
    first = client.responses.create(model=REAL_MODEL, input=INTRODUCTION, max_output_tokens=LONG, **GREEDY)
    second = client.responses.create(model=REAL_MODEL, input=QUESTION, previous_response_id=first.id,
                                     max_output_tokens=LONG, **GREEDY)
    alone = client.responses.create(model=REAL_MODEL, input=QUESTION, store=False, max_output_tokens=LONG, **GREEDY)
    assert REMEMBERED in second.output_text.lower()
    assert REMEMBERED not in alone.output_text.lower()  # the answer came from the first turn
    # The second prompt continues the first conversation, so its prefix comes from the cache.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_native_chat_previous_response_id_keeps_context(http: httpx.Client) -> None:
    def ask(**body: Any) -> dict[str, Any]:
        response = http.post("/api/v1/chat", json={"model": REAL_MODEL, "max_output_tokens": LONG, **GREEDY, **body})
        assert response.status_code == 200, response.text
        return response.json()

    first = ask(input=INTRODUCTION)
    second = ask(input=QUESTION, previous_response_id=first["response_id"])
    alone = ask(input=QUESTION, store=False)
    assert REMEMBERED in second["output"][0]["content"].lower()
    assert REMEMBERED not in alone["output"][0]["content"].lower()
    assert second["stats"]["input_tokens"] > first["stats"]["input_tokens"] + first["stats"]["total_output_tokens"]


def test_second_turn_reports_cached_prefix(client: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    turn = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model=REAL_MODEL, messages=turn, max_tokens=LONG, **GREEDY)
    assert first.usage is not None and first.choices[0].finish_reason == "stop"
    follow = [*turn, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(model=REAL_MODEL, messages=follow, max_tokens=LONG, **GREEDY)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens

    # Anthropic's usage names the same reuse cache_read_input_tokens, and input_tokens excludes it.
    third = claude.messages.create(model=REAL_MODEL, max_tokens=LONG, extra_body=GREEDY, system=turn[0]["content"],
                                   messages=[*follow[1:], {"role": "assistant", "content": "Rome."},
                                             {"role": "user", "content": "And of Spain?"}])
    assert third.usage.cache_read_input_tokens and third.usage.cache_read_input_tokens >= first.usage.prompt_tokens
