"""`lmkube serve --temp/--top-k/--top-p/--min-p/--repeat-penalty`: the sampling of requests that leave a
parameter out, in every API family; the request's own value still wins."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import LMKUBE, ServerProcess

from lmkube.synthetic_gguf import write_llama_model

MODEL = "acme/sampled"
TOKENS = 24
PROMPT = "Write a long story about a lighthouse."


@pytest.fixture(scope="module")
def greedy_server(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("sampling-models")
    write_llama_model(models / "acme" / "sampled" / "sampled-F16.gguf", seed=11)
    return start_server(models, "--temp", "0", "--parallel", "1")


def chat_completion(client: httpx.Client, **sampling: Any) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS, **sampling}
    return client.post("/v1/chat/completions", json=body).raise_for_status().json()["choices"][0]["message"]["content"]


def completion(client: httpx.Client, **sampling: Any) -> str:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, **sampling}
    return client.post("/v1/completions", json=body).raise_for_status().json()["choices"][0]["text"]


def message(client: httpx.Client, **sampling: Any) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS, **sampling}
    return client.post("/v1/messages", json=body).raise_for_status().json()["content"][0]["text"]


def response(client: httpx.Client, **sampling: Any) -> str:
    body = {"model": MODEL, "input": PROMPT, "max_output_tokens": TOKENS, "store": False, **sampling}
    return client.post("/v1/responses", json=body).raise_for_status().json()["output"][0]["content"][0]["text"]


def native_chat(client: httpx.Client, **sampling: Any) -> str:
    body = {"model": MODEL, "input": PROMPT, "max_output_tokens": TOKENS, "store": False, **sampling}
    output = client.post("/api/v1/chat", json=body).raise_for_status().json()["output"]
    return "".join(item["content"] for item in output if item["type"] == "message")


def legacy_chat(client: httpx.Client, **sampling: Any) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS, **sampling}
    return client.post("/api/v0/chat/completions", json=body).raise_for_status().json()["choices"][0]["message"][
        "content"]


@pytest.mark.parametrize("send", [chat_completion, completion, message, response, native_chat, legacy_chat])
def test_a_request_without_sampling_fields_takes_the_servers_defaults(greedy_server: ServerProcess, send: Any) -> None:
    with httpx.Client(base_url=greedy_server.base_url, timeout=120) as client:
        left_out = send(client)
        assert left_out, "the model wrote nothing"
        assert send(client) == left_out  # greedy: the same answer every time
        assert send(client, temperature=0) == left_out
        # The request's own temperature wins over the server's.
        assert send(client, temperature=1.8, seed=7) != left_out


@pytest.mark.parametrize(("flag", "value", "wording"), [
    ("--temp", "-0.5", "must be 0 or more"), ("--top-p", "1.5", "must be between 0 and 1"),
    ("--min-p", "nan", "must be between 0 and 1"), ("--repeat-penalty", "0", "must be more than 0"),
    ("--top-k", "-1", "must be 0 or more")])
def test_a_bad_sampling_default_is_a_usage_error(tmp_path: Path, flag: str, value: str, wording: str) -> None:
    result = subprocess.run([LMKUBE, "serve", "--models-dir", str(tmp_path), flag, value],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"argument {flag}: {wording}" in result.stderr
