"""The request shapes Claude Code and the Codex CLI send, each through the official SDK (or httpx where the
SDK has no field for it) against a real server: a system message inside Anthropic `messages`, namespace and
hosted tools and several developer items on /v1/responses, tools for templates that ignore them, each
family's context-overflow wording, `HEAD /`, the lmkube-tool-choice header and the per-request log line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from support import ServerProcess, wait_until

from lmkube.random_ids import new_token
from lmkube.synthetic_gguf import write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
CHATML = "acme/tiny-chat"  # synthetic ChatML template: ignores tools, like SmolLM2's
QWEN = "acme/qwen-tools"  # Qwen2.5's template: renders tools itself
# An enum keeps forced calls of the random-weight models short.
BASH = {"name": "Bash", "description": "Run a shell command", "input_schema": {
    "type": "object", "properties": {"command": {"type": "string", "enum": ["ls", "pwd"]}}, "required": ["command"]}}
USER = [{"role": "user", "content": "List the files."}]
# The other shape in one of Codex's requests: agent tools grouped in a namespace.
NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents", "tools": [
    {"type": "function", "name": "close_agent", "description": "Close an agent", "strict": False,
     "parameters": {"type": "object", "properties": {"id": {"type": "string", "enum": ["7"]}}, "required": ["id"]}}]}
EXEC = {"type": "function", "name": "exec_command", "description": "Runs a command", "strict": False,
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}


@pytest.fixture(scope="module")
def token() -> str:
    return new_token()


@pytest.fixture(scope="module")
def shapes_server(start_server: Any, tmp_path_factory: pytest.TempPathFactory, token: str) -> ServerProcess:
    models = tmp_path_factory.mktemp("shapes-models")
    write_llama_model(models / "acme" / "tiny-chat" / "tiny-chat-F16.gguf", seed=1)
    write_llama_model(models / "acme" / "qwen-tools" / "qwen-tools-F16.gguf", seed=5, extra_special_tokens=(
        "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
        chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text())
    return start_server(models, "--api-token", token, "--no-auto-evict", token=token)


@pytest.fixture(scope="module")
def claude(shapes_server: ServerProcess, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=shapes_server.base_url, api_key=token, max_retries=0)


@pytest.fixture(scope="module")
def codex(shapes_server: ServerProcess, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{shapes_server.base_url}/v1", api_key=token, max_retries=0)


def count(client: anthropic.Anthropic, **kwargs: Any) -> int:
    return client.messages.count_tokens(**kwargs).input_tokens


def test_a_system_message_inside_messages_is_a_system_turn(claude: anthropic.Anthropic) -> None:
    # Claude Code 2.1: the environment as a system message after the first user turn.
    system = {"role": "system", "content": [{"type": "text", "text": "# Environment\nPlatform: linux"}]}
    message = claude.messages.create(model=CHATML, max_tokens=4, messages=[*USER, system])
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 4
    assert count(claude, model=CHATML, messages=[*USER, system]) > count(claude, model=CHATML, messages=USER)
    for model in (CHATML, QWEN):  # and where it stands, before a later user turn
        later = [*USER, {"role": "assistant", "content": "Sure."}, system, {"role": "user", "content": "Go on."}]
        assert claude.messages.create(model=model, max_tokens=2, messages=later).usage.output_tokens == 2


def test_tools_reach_the_prompt_of_a_template_that_ignores_them(claude: anthropic.Anthropic,
                                                                 codex: openai.OpenAI) -> None:
    plain = count(claude, model=CHATML, messages=USER)
    with_tools = count(claude, model=CHATML, messages=USER, tools=[BASH])
    assert with_tools > plain + 40  # the tool's JSON and the call format
    # The same prompt on every family: chat completions' usage agrees with count_tokens.
    completion = codex.chat.completions.create(model=CHATML, max_tokens=1, messages=USER, tools=[
        {"type": "function", "function": {"name": "Bash", "description": BASH["description"],
                                          "parameters": BASH["input_schema"]}}])
    assert completion.usage.prompt_tokens == with_tools
    # A call the model then writes in the described format parses (forced here: random weights).
    message = claude.messages.create(model=CHATML, max_tokens=200, messages=USER, tools=[BASH],
                                     tool_choice={"type": "tool", "name": "Bash"})
    call = next((block for block in message.content if block.type == "tool_use"), None)
    assert call is not None, message
    assert message.stop_reason == "tool_use" and call.name == "Bash" and isinstance(call.input["command"], str)
    # The call and its result, in history, are in the prompt too.
    history = [*USER, {"role": "assistant", "content": [call.model_dump()]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "a.txt b.txt"}]}]
    assert count(claude, model=CHATML, messages=history, tools=[BASH]) > with_tools + 10


def test_deferred_tools_wait_for_a_tool_reference(claude: anthropic.Anthropic) -> None:
    deferred = {**BASH, "name": "WebFetch", "defer_loading": True}
    assert count(claude, model=CHATML, messages=USER, tools=[BASH, deferred]) == \
        count(claude, model=CHATML, messages=USER, tools=[BASH])
    search = {"name": "ToolSearch", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}
    history = [*USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "ToolSearch", "input": {"query": "select:WebFetch"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "tool_reference", "tool_name": "WebFetch"}]}]}]
    loaded = count(claude, model=CHATML, messages=history, tools=[search, deferred])
    assert loaded > count(claude, model=CHATML, messages=history, tools=[search]) + 20


def test_context_overflow_in_each_familys_words(shapes_server: ServerProcess, claude: anthropic.Anthropic,
                                                codex: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=CHATML, max_tokens=4, messages=long)
    message = caught.value.body["error"]["message"]
    assert message.startswith("prompt is too long: ") and message.endswith(" tokens > 2048 maximum")
    with pytest.raises(openai.BadRequestError) as chat_error:
        codex.chat.completions.create(model=CHATML, max_tokens=4, messages=long)
    assert chat_error.value.code == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in chat_error.value.message
    with pytest.raises(openai.BadRequestError) as responses_error:
        codex.responses.create(model=CHATML, input=long[0]["content"], max_output_tokens=4)
    assert responses_error.value.code == "context_length_exceeded"
    assert "Your input exceeds the context window of this model" in responses_error.value.message


def test_namespace_tools_are_flattened_and_calls_name_their_namespace(codex: openai.OpenAI) -> None:
    response = codex.responses.create(model=QWEN, input="Close agent 7",
                                      tools=[EXEC, NAMESPACE, {"type": "web_search"}],
                                      tool_choice={"type": "function", "name": "multi_agent_v1__close_agent"},
                                      max_output_tokens=200, store=False)
    call = next(item for item in response.output if item.type == "function_call")
    assert call.name == "close_agent" and call.model_dump().get("namespace") == "multi_agent_v1"
    # Codex sends the call back with its namespace, and the output after it.
    answered = codex.responses.create(model=QWEN, tools=[EXEC, NAMESPACE], store=False, max_output_tokens=2, input=[
        {"role": "user", "content": "Close agent 7"},
        {"type": "function_call", "call_id": call.call_id, "name": "close_agent", "namespace": "multi_agent_v1",
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "closed"}])
    assert answered.status == "incomplete" and answered.usage.input_tokens > response.usage.input_tokens


def test_hosted_tools_are_left_out_and_logged(shapes_server: ServerProcess, codex: openai.OpenAI) -> None:
    plain = codex.responses.create(model=QWEN, input="Hi", tools=[EXEC], max_output_tokens=1, store=False)
    hosted = codex.responses.create(model=QWEN, input="Hi", max_output_tokens=1, store=False, tools=[
        EXEC, {"type": "web_search", "external_web_access": False}, {"type": "file_search", "vector_store_ids": []}])
    assert hosted.usage.input_tokens == plain.usage.input_tokens
    wait_until(lambda: "left out tools this server cannot run: web_search, file_search" in shapes_server.log())


def test_every_developer_item_reaches_the_model(codex: openai.OpenAI) -> None:
    def tokens(**kwargs: Any) -> int:
        return codex.responses.create(model=CHATML, max_output_tokens=1, store=False, **kwargs).usage.input_tokens

    agent_prompt = {"role": "developer", "content": [{"type": "input_text", "text": "You are a coding agent. " * 20}]}
    skills = {"role": "developer", "content": [{"type": "input_text", "text": "Skills: none."}]}
    user = {"role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}
    both = tokens(input=[agent_prompt, skills, user])
    assert both > tokens(input=[skills, user]) + 60 and both > tokens(input=[agent_prompt, user])
    # `instructions` come first, and the developer items stay.
    assert tokens(instructions="Be brief.", input=[agent_prompt, skills, user]) > both


def test_head_and_get_root_answer_without_a_token(shapes_server: ServerProcess) -> None:
    assert httpx.head(f"{shapes_server.base_url}/").status_code == 200
    root = httpx.get(f"{shapes_server.base_url}/")
    assert root.status_code == 200 and root.json()["status"] == "ok"


def test_tool_choice_header_forces_the_first_call_only(shapes_server: ServerProcess, token: str) -> None:
    headers = {"x-api-key": token, "lmkube-tool-choice": "Bash"}
    body = {"model": CHATML, "max_tokens": 200, "messages": USER, "tools": [BASH]}
    forced = httpx.post(f"{shapes_server.base_url}/v1/messages", json=body, headers=headers, timeout=60).json()
    call = next(block for block in forced["content"] if block["type"] == "tool_use")
    assert forced["stop_reason"] == "tool_use" and call["name"] == "Bash"
    # The turn that answers the tool result is answered in text (tool_choice none), so an agent loop ends.
    answer = [*USER, {"role": "assistant", "content": [call]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "ok"}]}]
    free = httpx.post(f"{shapes_server.base_url}/v1/messages", json={**body, "max_tokens": 8, "messages": answer},
                      headers=headers, timeout=60).json()
    assert free["stop_reason"] == "max_tokens" and [b["type"] for b in free["content"]] == ["text"]
    bad = httpx.post(f"{shapes_server.base_url}/v1/messages", json=body, timeout=60,
                     headers={**headers, "lmkube-tool-choice": "Nope"})
    assert bad.status_code == 400 and "Nope" in bad.json()["error"]["message"]


def test_each_request_logs_its_prompt_cache_and_prefill(shapes_server: ServerProcess,
                                                        claude: anthropic.Anthropic) -> None:
    claude.messages.create(model=CHATML, max_tokens=3, messages=[{"role": "user", "content": "log me please"}])
    line = wait_until(lambda: next((line for line in shapes_server.log().splitlines()
                                    if "INFO" in line and "prompt tokens (" in line and "tokens generated" in line),
                                   None))
    assert "cached)" in line and "prefill" in line and "waited" in line
