"""What the Responses API test modules share (tests/test_responses_api.py, test_responses_stored.py,
test_responses_tools.py): a server with the models they use, an openai SDK client and an httpx client for it
(module fixtures: each module starts its own server), the tools and schemas they send, and two checks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import ServerProcess

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
