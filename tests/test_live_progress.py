"""Live progress on LM Studio's `/api/v1/chat` streams: `model_load.progress` from llama.cpp's load callback
during a JIT load, and `prompt_processing.progress` after each chunk of a long prompt; the same load progress
on a streamed `POST /api/v1/models/load` (what `lmkube load` draws as a bar and the operator writes to
`status.load`)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pexpect
import pytest
from cli_support import cli_env, run_cli
from support import LMKUBE, ServerProcess

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

# More layers (and tensors) than the tiny default: llama.cpp calls back once per tensor it loads.
DEEP = "acme/deep-chat"
SHALLOW = "acme/shallow-chat"
DEEP_SHAPE = LlamaShape(n_layer=12, n_ctx_train=4096)


def write_alien_model(path: Path) -> None:
    """A GGUF the store lists (its header reads fine) that llama.cpp refuses: an architecture it does not know."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_name("alien")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def progress_server(start_server, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("progress-models")
    write_llama_model(models / "acme" / "deep-chat" / "deep-chat-F16.gguf", shape=DEEP_SHAPE, seed=8)
    write_llama_model(models / "acme" / "shallow-chat" / "shallow-chat-F16.gguf", seed=9)
    write_alien_model(models / "acme" / "alien-chat" / "alien-chat-F32.gguf")
    return start_server(models, "--no-auto-evict")


@pytest.fixture(scope="module")
def http(progress_server: ServerProcess) -> Iterator[httpx.Client]:
    with progress_server.client() as client:
        yield client


def sse(http: httpx.Client, path: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                events.append((name, data))
    return events


def unload_all(http: httpx.Client) -> None:
    for model in http.get("/api/v1/models").json()["models"]:
        for instance in model["loaded_instances"]:
            assert http.post("/api/v1/models/unload", json={"instance_id": instance["id"]}).status_code == 200


def rising_to_one(values: list[float]) -> None:
    assert len(values) > 1, values
    assert all(0 < a < b for a, b in itertools.pairwise(values)), values
    assert values[-1] == 1.0


def test_jit_load_streams_real_progress_in_order(http: httpx.Client) -> None:
    unload_all(http)
    events = sse(http, "/api/v1/chat", {"model": DEEP, "input": "Hello", "stream": True, "max_output_tokens": 3,
                                        "store": False})
    names = [name for name, _ in events]
    assert names[:2] == ["chat.start", "model_load.start"] and names[-1] == "chat.end" and "error" not in names
    first, last = names.index("model_load.progress"), names.index("model_load.end")
    assert set(names[first:last]) == {"model_load.progress"}  # nothing else while it loads
    progress = [data["progress"] for name, data in events if name == "model_load.progress"]
    rising_to_one(progress)
    assert len(progress) >= 10  # one per 1 % step of llama.cpp's per-tensor callback, not a single 1.0
    assert all(data["model_instance_id"] == DEEP for name, data in events if name.startswith("model_load."))
    assert names[last + 1] == "prompt_processing.start" and names.index("message.delta") > last
    result = events[-1][1]["result"]
    assert result["stats"]["model_load_time_seconds"] == events[last][1]["load_time_seconds"]
    # Loaded now: the next request streams no load events.
    again = [name for name, _ in sse(http, "/api/v1/chat", {"model": DEEP, "input": "Hi", "stream": True,
                                                             "max_output_tokens": 1, "store": False})]
    assert not [name for name in again if name.startswith("model_load.")]


def test_long_prompt_streams_prompt_processing_progress(http: httpx.Client) -> None:
    unload_all(http)
    loaded = http.post("/api/v1/models/load", json={"model": SHALLOW, "eval_batch_size": 32, "context_length": 2048,
                                                    "parallel": 1})
    assert loaded.status_code == 200, loaded.text
    prompt = " ".join(["the world and the model"] * 80)  # ≈ 900 tokens: about 28 chunks of 32
    events = sse(http, "/api/v1/chat", {"model": SHALLOW, "input": prompt, "stream": True, "max_output_tokens": 2,
                                        "store": False})
    names = [name for name, _ in events]
    start, end = names.index("prompt_processing.start"), names.index("prompt_processing.end")
    assert set(names[start + 1:end]) == {"prompt_processing.progress"}
    assert end < names.index("message.delta")
    progress = [data["progress"] for name, data in events if name == "prompt_processing.progress"]
    rising_to_one(progress)
    assert events[-1][1]["result"]["stats"]["input_tokens"] > 20 * 32
    # One after each chunk (those that came while the stream was busy writing fold into the latest), then 1.0
    # as the first token comes.
    assert len(progress) >= 5 and progress[0] < 0.5
    # A short prompt (one chunk) has only the final progress.
    short = sse(http, "/api/v1/chat", {"model": SHALLOW, "input": "Hi", "stream": True, "max_output_tokens": 1,
                                       "store": False})
    assert [data["progress"] for name, data in short if name == "prompt_processing.progress"] == [1.0]
    unload_all(http)


def test_streamed_load_reports_progress_then_the_answer(http: httpx.Client) -> None:
    unload_all(http)
    events = sse(http, "/api/v1/models/load", {"model": DEEP, "stream": True, "echo_load_config": True,
                                               "identifier": "deep-streamed"})
    names = [name for name, _ in events]
    assert names[0] == "model_load.start" and names[-1] == "model_load.end"
    assert set(names[1:-1]) == {"model_load.progress"}
    rising_to_one([data["progress"] for name, data in events if name == "model_load.progress"])
    result = events[-1][1]["result"]
    assert result["instance_id"] == events[-1][1]["model_instance_id"] == "deep-streamed"
    assert result["status"] == "loaded" and result["load_config"]["context_length"] > 0
    assert "deep-streamed" in {i["id"] for i in http.get("/api/v1/instances").json()["instances"]}
    # Refusals come before the stream starts, with their status; a load that fails in llama.cpp is an event.
    taken = http.post("/api/v1/models/load", json={"model": DEEP, "stream": True, "identifier": "deep-streamed"})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "identifier_in_use"
    missing = http.post("/api/v1/models/load", json={"model": "acme/none", "stream": True})
    assert missing.status_code == 404
    assert http.post("/api/v1/models/load", json={"model": DEEP, "stream": "yes"}).status_code == 400
    unload_all(http)



def test_cli_load_shows_the_load_progress(progress_server: ServerProcess, http: httpx.Client) -> None:
    unload_all(http)
    # Not a terminal (a pipe): a line per quarter, then the usual answer on stdout.
    piped = run_cli("load", DEEP, "--identifier", "deep-cli", server=progress_server)
    assert piped.code == 0, piped.err
    assert piped.out.startswith("Model loaded successfully in ") and '"deep-cli"' in piped.out
    lines = [line.strip() for line in piped.err.splitlines() if line.strip().endswith("% loaded")]
    assert len(lines) >= 2 and lines[-1] == "100.0% loaded", piped.err
    assert [float(line.split("%")[0]) for line in lines] == sorted(float(line.split("%")[0]) for line in lines)
    # On a terminal: one bar, redrawn in place up to 100 %.
    child = pexpect.spawn(LMKUBE, ["load", DEEP, "--identifier", "deep-tty"], env=cli_env(progress_server, TERM="dumb"),
                          encoding="utf-8", timeout=120)
    try:
        child.expect_exact("Loading acme/deep-chat ...")
        child.expect(r"\r[█░]{30}\s+100\.0%\r?\n")
        child.expect_exact('use the identifier "deep-tty"')
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    output = child.before or ""
    assert "% loaded" not in output
    # --json: the server's answer alone, no progress.
    quiet = run_cli("load", DEEP, "--identifier", "deep-json", "--json", server=progress_server)
    assert quiet.code == 0 and json.loads(quiet.out)["instance_id"] == "deep-json" and "%" not in quiet.err
    refused = run_cli("load", DEEP, "--identifier", "deep-json", server=progress_server)
    assert refused.code != 0 and "already loaded" in refused.err
    unload_all(http)


def test_a_jit_load_streams_from_its_start_and_a_failed_load_is_an_error_event(http: httpx.Client) -> None:
    """The stream of a request that JIT-loads starts with the load (so its progress is live), not once the
    prompt is submitted: what fails after that, a load llama.cpp refuses here, is an `error` event."""
    events = sse(http, "/api/v1/chat", {"model": "acme/alien-chat", "input": "Hi", "stream": True})
    names = [name for name, _ in events]
    assert names[:2] == ["chat.start", "model_load.start"] and names[-2:] == ["error", "chat.end"], names
    error = events[-2][1]["error"]
    assert error["code"] == "model_load_failed" and "alien-chat" in error["message"]
    # Without streaming: the plain error, as before.
    plain = http.post("/api/v1/chat", json={"model": "acme/alien-chat", "input": "Hi"})
    assert plain.status_code == 422 and plain.json()["error"]["code"] == "model_load_failed"
    # The other families too: a JIT load that fails is a 422 in their shapes, not a 500.
    openai_shape = http.post("/v1/chat/completions", json={"model": "acme/alien-chat",
                                                           "messages": [{"role": "user", "content": "Hi"}]})
    assert openai_shape.status_code == 422 and openai_shape.json()["error"]["code"] == "model_load_failed"
    loaded = http.post("/api/v1/models/load", json={"model": "acme/alien-chat", "stream": True, "force": True})
    assert loaded.status_code == 200 and "event: error" in loaded.text and "model_load_failed" in loaded.text
