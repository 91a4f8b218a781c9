"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) driven by the official anthropic SDK."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from support import ServerProcess

from lmkube.random_ids import new_token
from lmkube.synthetic_gguf import LlamaShape, write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
CHAT = "acme/tiny-chat"
TOOLS = "acme/qwen-tools"
THINKER = "acme/r1-think"
EOS = "acme/eos-chat"

WEATHER = {
    "name": "get-weather",  # normalized for the model, mapped back
    "description": "Current weather",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
    },
}
PING = {"name": "ping", "input_schema": {"type": "object", "properties": {}}}
USER = [{"role": "user", "content": "What's the weather?"}]
GREEDY = {"temperature": 0}  # not among the SDK's arguments any more; the API still takes it


@pytest.fixture(scope="module")
def token() -> str:
    return new_token()


@pytest.fixture(scope="module")
def msg_server(start_server, tmp_path_factory: pytest.TempPathFactory, token: str) -> ServerProcess:
    models = tmp_path_factory.mktemp("anthropic-models")
    write_llama_model(models / "acme" / "tiny-chat" / "tiny-chat-F16.gguf", seed=1, name="Tiny Chat")
    write_llama_model(models / "acme" / "qwen-tools" / "qwen-tools-F16.gguf", seed=5, extra_special_tokens=(
        "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
        chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text())
    # Ends its turn on its own after a few tokens (a strong </s> logit).
    write_llama_model(models / "acme" / "eos-chat" / "eos-chat-F16.gguf", seed=7, emit_eos=True, eos_gain=2.0)
    # A long context, so a generation that nobody stops runs far longer than the disconnect test waits.
    write_llama_model(models / "acme" / "long-chat" / "long-chat-F16.gguf", seed=1, shape=LlamaShape(n_ctx_train=65536))
    r1_template = (TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text()
    write_llama_model(models / "acme" / "r1-think" / "r1-think-F16.gguf", seed=6,
                      extra_special_tokens=("<think>", "</think>"), chat_template=r1_template)
    # --max-queue 0: a request finding every slot busy is refused at once (529 here), see test_overloaded_is_529.
    return start_server(models, "--parallel", "2", "--max-queue", "0", "--api-token", token, token=token)


@pytest.fixture(scope="module")
def client(msg_server: ServerProcess, token: str) -> anthropic.Anthropic:
    # The base URL has no /v1, as clients configure it (ANTHROPIC_BASE_URL); the SDK sends x-api-key.
    return anthropic.Anthropic(base_url=msg_server.base_url, api_key=token, max_retries=0)


def post(server: ServerProcess, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers={**server.headers, **headers}, timeout=60)


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    return body["error"]["message"]


def without_id(message: Any) -> dict[str, Any]:
    """A message to compare with another request's: ids are fresh, and how much of the prompt came from
    the KV cache depends on what ran before (the whole prompt's size does not)."""
    dumped = message.model_dump(exclude_none=True)
    dumped.pop("id")
    usage = dumped["usage"]
    usage["input_tokens"] += usage.pop("cache_read_input_tokens")
    for block in dumped["content"]:
        block.pop("parsed_output", None)  # the stream helper's parsed view (none without an output format)
    return dumped


def test_create_message_shape_and_system_forms(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=CHAT, max_tokens=8, extra_body=GREEDY, system="You are terse.",
                                     messages=USER)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == CHAT
    assert [b.type for b in message.content] == ["text"] and message.content[0].text
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    assert message.usage.output_tokens == 8
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens > 10
    assert message.usage.cache_creation_input_tokens == 0
    blocks = client.messages.create(model=CHAT, max_tokens=8, extra_body=GREEDY, messages=USER,
                                    system=[{"type": "text", "text": "You are terse.",
                                             "cache_control": {"type": "ephemeral"}}])
    assert blocks.content == message.content  # the same prompt: greedy gives the same text
    plain = client.messages.create(model=CHAT, max_tokens=8, extra_body=GREEDY, messages=USER)
    assert plain.content != message.content


def test_multi_turn_and_cached_prefix(client: anthropic.Anthropic) -> None:
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        {"role": "user", "content": "Another one?"},
    ]
    first = client.messages.create(model=CHAT, max_tokens=4, extra_body=GREEDY, messages=turns)
    again = client.messages.create(model=CHAT, max_tokens=4, extra_body=GREEDY, messages=turns)
    counted = client.messages.count_tokens(model=CHAT, messages=turns).input_tokens
    for message in (first, again):
        assert message.usage.input_tokens + message.usage.cache_read_input_tokens == counted
    assert again.usage.cache_read_input_tokens > 0  # the slot kept the prompt's KV cache
    assert again.content == first.content
    single = client.messages.count_tokens(model=CHAT, messages=turns[:1]).input_tokens
    assert counted > single


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model=CHAT, max_tokens=32, extra_body=GREEDY, messages=USER).content[0].text
    stop = full[5:8]
    stopped = client.messages.create(model=CHAT, max_tokens=32, extra_body=GREEDY, messages=USER,
                                     stop_sequences=["\x00never", stop])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)
    assert "".join(b.text for b in stopped.content) == full[: full.index(stop)]
    assert stopped.usage.output_tokens < 32


def test_end_turn_streamed_and_not(client: anthropic.Anthropic) -> None:
    kwargs = {"model": EOS, "max_tokens": 300, "extra_body": GREEDY, "messages": USER}
    message = client.messages.create(**kwargs)
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert 0 < message.usage.output_tokens < 300
    with client.messages.stream(**kwargs) as stream:
        assert without_id(stream.get_final_message()) == without_id(message)


def test_structured_output_config_format(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}},
              "required": ["answer", "ok"], "additionalProperties": False}
    message = client.messages.create(model=CHAT, max_tokens=100, messages=USER, extra_body=GREEDY,
                                     output_config={"format": {"type": "json_schema", "schema": schema},
                                                    "effort": "low"})
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(message.content[0].text), schema)


@pytest.fixture
def long_chat(msg_server: ServerProcess) -> str:
    """A one-slot instance whose generations would run for minutes unless stopped."""
    loaded = post(msg_server, "/api/v1/models/load", {"model": "acme/long-chat", "context_length": 65536,
                                                      "parallel": 1})
    assert loaded.status_code == 200, loaded.text
    return "acme/long-chat"


def wait_until_idle(server: ServerProcess) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        instances = httpx.get(f"{server.base_url}/api/v1/instances", headers=server.headers).json()
        busy = [i for i in instances["instances"] if i["active"] or i["queued"]]
        if not busy:
            return
        time.sleep(0.05)
    raise AssertionError(f"still busy: {busy}")


def test_overloaded_is_529(client: anthropic.Anthropic, msg_server: ServerProcess, long_chat: str) -> None:
    with client.messages.stream(model=long_chat, max_tokens=60000, messages=USER) as stream:
        next(e for e in stream if e.type == "content_block_delta")  # the only slot is busy
        with pytest.raises(anthropic.OverloadedError) as caught:
            client.messages.create(model=long_chat, max_tokens=1, messages=USER)
        assert caught.value.body["error"]["type"] == "overloaded_error"
        assert caught.value.response.headers["retry-after"]
        assert client.messages.count_tokens(model=long_chat, messages=USER).input_tokens > 0  # generates nothing
    wait_until_idle(msg_server)


def test_stream_disconnect_frees_the_slot(client: anthropic.Anthropic, msg_server: ServerProcess,
                                          long_chat: str) -> None:
    with client.messages.stream(model=long_chat, max_tokens=60000, messages=USER) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break
    wait_until_idle(msg_server)  # long before the generation could have ended
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
        httpx.post(f"{msg_server.base_url}/v1/messages", headers=msg_server.headers, timeout=httpx.Timeout(60, read=1),
                   json={"model": long_chat, "max_tokens": 60000, "messages": USER})
    wait_until_idle(msg_server)


def test_streaming_event_order_and_final_message(client: anthropic.Anthropic, msg_server: ServerProcess) -> None:
    kwargs = {"model": CHAT, "max_tokens": 16, "extra_body": GREEDY, "system": "Be brief.", "messages": USER}
    plain = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert without_id(final) == without_id(plain)
    raw = [e for e in events if e in ("message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop")]
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    # On the wire: named events whose data carries the same type, a ping among them.
    wire = {**{k: v for k, v in kwargs.items() if k != "extra_body"}, **GREEDY}
    with httpx.stream("POST", f"{msg_server.base_url}/v1/messages", json={**wire, "stream": True},
                      headers=msg_server.headers, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in response.read().decode().split("\n\n") if f]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    data = [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]
    assert [d["type"] for d in data] == names
    assert names[0] == "message_start" and "ping" in names and names[-1] == "message_stop"
    start = data[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None


def test_forced_tool_use_round_trips_with_tool_result(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=TOOLS, max_tokens=200, extra_body=GREEDY, messages=USER,
                                     tools=[PING, WEATHER], tool_choice={"type": "tool", "name": "get-weather"})
    assert message.stop_reason == "tool_use"
    calls = [b for b in message.content if b.type == "tool_use"]
    assert len(calls) == 1
    call = calls[0]
    assert call.id.startswith("toolu_") and call.name == "get-weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])

    with client.messages.stream(model=TOOLS, max_tokens=200, extra_body=GREEDY, messages=USER, tools=[PING, WEATHER],
                                tool_choice={"type": "tool", "name": "get-weather"}) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert "input_json_delta" in deltas
    streamed_call, plain_call = without_id(streamed), without_id(message)
    for dumped in (streamed_call, plain_call):  # call ids are fresh per request
        assert all(b.pop("id").startswith("toolu_") for b in dumped["content"] if b["type"] == "tool_use")
    assert streamed_call == plain_call

    def history(result: str) -> list[dict[str, Any]]:
        return [*USER, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]}]

    answered = client.messages.create(model=TOOLS, max_tokens=4, extra_body=GREEDY, tools=[WEATHER],
                                      messages=history('{"temp": 3}'))
    assert answered.content and answered.stop_reason in ("max_tokens", "end_turn", "tool_use")
    short = client.messages.count_tokens(model=TOOLS, tools=[WEATHER], messages=history("1")).input_tokens
    long = client.messages.count_tokens(model=TOOLS, tools=[WEATHER],
                                        messages=history("sunny, light wind from the north")).input_tokens
    assert long > short  # the tool result is in the prompt
    blocks = client.messages.count_tokens(model=TOOLS, tools=[WEATHER], messages=[*history("1")[:2], {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "is_error": True,
                                     "content": [{"type": "text", "text": "1"}]}]}]).input_tokens
    assert blocks > short  # the error is marked for the model


def test_any_tool_choice_without_parallel_calls(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=TOOLS, max_tokens=200, extra_body=GREEDY, messages=USER,
                                     tools=[WEATHER, PING],
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True})
    calls = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(calls) == 1
    tool = {"get-weather": WEATHER, "ping": PING}[calls[0].name]
    jsonschema.validate(calls[0].input, tool["input_schema"])


def test_tools_reach_the_prompt_unless_tool_choice_none(client: anthropic.Anthropic) -> None:
    def count(**kwargs: Any) -> int:
        return client.messages.count_tokens(model=TOOLS, messages=USER, **kwargs).input_tokens

    assert count(tools=[WEATHER]) > count() == count(tools=[WEATHER], tool_choice={"type": "none"})


def test_thinking_blocks(client: anthropic.Anthropic) -> None:
    kwargs = {"model": THINKER, "max_tokens": 12, "extra_body": GREEDY, "messages": USER,
              "thinking": {"type": "enabled", "budget_tokens": 2048}}
    message = client.messages.create(**kwargs)
    assert message.content[0].type == "thinking"
    thinking = message.content[0]
    assert thinking.thinking and thinking.signature
    with client.messages.stream(**kwargs) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert without_id(streamed) == without_id(message)
    assert deltas[0] == "thinking_delta" and deltas[-1] == "signature_delta"
    off = client.messages.create(**{**kwargs, "thinking": {"type": "disabled"}})
    assert [b.type for b in off.content] == ["text"]
    # Thinking blocks go back as history.
    follow = client.messages.create(**{**kwargs, "messages": [
        *USER, {"role": "assistant", "content": [b.model_dump() for b in message.content] + [
            {"type": "redacted_thinking", "data": "opaque"}, {"type": "text", "text": "Sunny."}]},
        {"role": "user", "content": "Thanks."}]})
    assert follow.usage.input_tokens + follow.usage.cache_read_input_tokens > message.usage.input_tokens


def test_auth_x_api_key_bearer_and_401(msg_server: ServerProcess, token: str) -> None:
    bearer = anthropic.Anthropic(base_url=msg_server.base_url, auth_token=token, max_retries=0)
    assert bearer.messages.count_tokens(model=CHAT, messages=USER).input_tokens > 0
    wrong = anthropic.Anthropic(base_url=msg_server.base_url, api_key="sk-wrong-key-123456", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model=CHAT, max_tokens=1, messages=USER)
    assert caught.value.status_code == 401
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert "sk-wrong-key-123456" not in caught.value.body["error"]["message"]
    response = httpx.post(f"{msg_server.base_url}/v1/messages", json={"model": CHAT, "max_tokens": 1, "messages": USER})
    assert "token is required" in anthropic_error(response, 401, "authentication_error")
    count = httpx.post(f"{msg_server.base_url}/v1/messages/count_tokens", content=b"{not json")
    anthropic_error(count, 401, "authentication_error")


def test_invalid_requests_are_400_invalid_request_error(client: anthropic.Anthropic, msg_server: ServerProcess) -> None:
    missing = post(msg_server, "/v1/messages", {"model": CHAT, "messages": USER})
    # Anthropic's own wording: clients match on it.
    assert anthropic_error(missing, 400, "invalid_request_error") == "max_tokens: Field required"
    role = post(msg_server, "/v1/messages", {"model": CHAT, "max_tokens": 1,
                                             "messages": [{"role": "tool", "content": "x"}]})
    assert anthropic_error(role, 400, "invalid_request_error") == \
        "messages.0.role: Input should be 'user', 'assistant' or 'system'"
    block = post(msg_server, "/v1/messages", {"model": CHAT, "max_tokens": 1,
                                              "messages": [{"role": "user", "content": [{"type": "video"}]}]})
    assert "video" in anthropic_error(block, 400, "invalid_request_error")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="does not support images") as caught:
        client.messages.create(model=CHAT, max_tokens=1, messages=[
            {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    server_tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    with pytest.raises(anthropic.BadRequestError, match="web_search_20250305"):
        client.messages.create(model=TOOLS, max_tokens=1, messages=USER, tools=[server_tool])
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        client.messages.create(model=TOOLS, max_tokens=1, messages=USER, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "nope"})


def test_unknown_model_is_404_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="acme/missing", max_tokens=1, messages=USER)
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert "acme/missing" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="acme/missing", messages=USER)


def test_unknown_beta_and_version_headers_are_ignored(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=CHAT, max_tokens=2, messages=USER, metadata={"user_id": "u1"},
                                     service_tier="auto", extra_headers={
                                         "anthropic-beta": "made-up-feature-2099-01-01",
                                         "anthropic-version": "2099-01-01"})
    assert message.usage.output_tokens == 2
    beta = client.beta.messages.create(model=CHAT, max_tokens=2, messages=USER, betas=["another-unknown-beta"])
    assert beta.type == "message" and beta.usage.output_tokens == 2
