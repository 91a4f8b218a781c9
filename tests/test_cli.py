"""The `lmkube` client commands (ls, load, unload, ps, log stream, server) run as subprocesses against a real
`lmkube serve` with an API token: text and --json output, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pytest
from cli_support import ANSI, cli_env, run_cli
from support import LMKUBE, ServerProcess, free_port, write_test_models

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

TOKEN = "sk-lm-CliTest1:abcdefghijABCDEFGHIJ"
LONG_MODEL = "acme/long-chat"  # greedy output never ends on its own: a request runs as long as max_tokens says
CONTEXT = 32768


@pytest.fixture(scope="module")
def srv(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("cli-models")
    write_test_models(models)
    write_llama_model(models / "acme" / "long-chat" / "long-chat-F32.gguf", dtype="f32", seed=4, name="Long Chat",
                      shape=LlamaShape(n_ctx_train=CONTEXT))
    return start_server(models, "--api-token", TOKEN, "--threads", "1", token=TOKEN)


def instances(server: ServerProcess) -> list[dict[str, Any]]:
    with server.client() as client:
        return client.get("/api/v1/instances").json()["instances"]


def test_help_has_examples() -> None:
    for command in (["--help"], ["ls", "--help"], ["load", "--help"], ["get", "--help"], ["chat", "--help"],
                    ["log", "stream", "--help"], ["server", "start", "--help"], ["ps", "--help"]):
        result = run_cli(*command)
        assert result.code == 0, result.err
        assert "examples:" in result.out, command


def test_ls_text_and_json(srv: ServerProcess) -> None:
    result = run_cli("ls", server=srv)
    assert result.code == 0, result.err
    assert result.out.startswith("You have 5 models, taking up ")
    assert "LLM" in result.out and "EMBEDDING" in result.out
    assert "acme/tiny-chat" in result.out and "acme/tiny-embed" in result.out
    assert ANSI not in result.out  # not a terminal: no colours

    models = json.loads(run_cli("ls", "--json", server=srv).out)
    by_key = {m["modelKey"]: m for m in models}
    assert by_key["acme/tiny-embed"]["type"] == "embedding"
    assert by_key["acme/tiny-chat"]["variants"] == ["acme/tiny-chat@f16", "acme/tiny-chat@f32"]
    assert by_key["acme/tiny-chat"]["format"] == "gguf" and by_key["acme/tiny-chat"]["sizeBytes"] > 0

    llms = json.loads(run_cli("ls", "--llm", "--json", server=srv).out)
    assert {m["type"] for m in llms} == {"llm"} and len(llms) == 4
    embeds = json.loads(run_cli("ls", "--embedding", "--json", server=srv).out)
    assert [m["modelKey"] for m in embeds] == ["acme/tiny-embed"]

    one = run_cli("ls", "acme/tiny-chat", "--variants", server=srv)
    assert one.code == 0
    assert "* acme/tiny-chat@" in one.out and "acme/tiny-chat@f32" in one.out and "acme/other-chat" not in one.out
    [entry] = json.loads(run_cli("ls", "acme/tiny-chat", "--json", server=srv).out)
    assert entry["model"]["modelKey"] == "acme/tiny-chat" and len(entry["variants"]) == 2

    missing = run_cli("ls", "nope/none", server=srv)
    assert missing.code == 1 and missing.err.count("\n") == 1 and "no model 'nope/none'" in missing.err


def test_errors_are_one_line_with_nonzero_exit(srv: ServerProcess) -> None:
    down = run_cli("ls", LMKUBE_BASE_URL=f"http://127.0.0.1:{free_port()}")
    assert down.code == 1 and down.out == ""
    assert down.err.startswith("lmkube: error: cannot connect to the lmkube server at http://127.0.0.1:")
    assert down.err.count("\n") == 1 and "Traceback" not in down.err

    # --host/--port win over LMKUBE_BASE_URL
    flags = run_cli("ps", "--host", "127.0.0.1", "--port", str(srv.port), server=srv, LMKUBE_BASE_URL="http://x:1")
    assert flags.code == 0, flags.err

    bad = run_cli("ps", server=srv, LMKUBE_API_TOKEN="sk-lm-wrong123:abcdefghijABCDEFGHIJ")
    assert bad.code == 1 and bad.err.count("\n") == 1
    assert "Invalid LM Studio API token" in bad.err and "LMKUBE_API_TOKEN" in bad.err

    none = run_cli("ps", LMKUBE_BASE_URL=srv.base_url)
    assert none.code == 1 and none.err.count("\n") == 1 and "set LMKUBE_API_TOKEN" in none.err

    unknown = run_cli("load", "nope/none", server=srv)
    assert unknown.code == 1 and unknown.err.count("\n") == 1
    assert 'Model "nope/none" not found' in unknown.err

    bad_flag = run_cli("load", "acme/tiny-chat", "--gpu", "2", server=srv)
    assert bad_flag.code == 2 and "expected a number from 0 to 1" in bad_flag.err


def test_load_estimate_only(srv: ServerProcess) -> None:
    result = run_cli("load", "acme/tiny-chat", "--estimate-only", "-c", "2048", "--gpu", "off", server=srv)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "Model: acme/tiny-chat@f16"
    assert "Context Length: 2,048" in lines
    assert any(line.startswith("GPU Offload: off (0/") for line in lines)
    assert any(line.startswith("Estimated GPU Memory:   0.00 GiB") for line in lines)
    assert any(line.startswith("Estimated Total Memory: ") and line.endswith("GiB") for line in lines)
    assert lines[-1] == "Estimate: This model fits in this machine's available memory."
    as_json = json.loads(run_cli("load", "acme/tiny-chat", "--estimate-only", "--json", server=srv).out)
    assert as_json["status"] == "estimated" and as_json["fits"] is True and as_json["estimate"]["total_bytes"] > 0
    assert not [i for i in instances(srv) if i["model_key"] == "acme/tiny-chat"]  # nothing was loaded


def test_load_ps_unload(srv: ServerProcess) -> None:
    loaded = run_cli("load", "acme/tiny-chat@f32", "--identifier", "cli-chat", "-c", "2048", "--parallel", "2",
                     "--ttl", "600", server=srv)
    assert loaded.code == 0, loaded.err
    assert loaded.out.startswith("Model loaded successfully in ")
    assert 'use the identifier "cli-chat"' in loaded.out

    table = run_cli("ps", server=srv)
    assert table.code == 0
    header, *rows = table.out.splitlines()
    assert header.split()[:4] == ["IDENTIFIER", "MODEL", "STATUS", "SIZE"]
    [row] = [r for r in rows if r.startswith("cli-chat ")]
    assert "acme/tiny-chat@f32" in row and "IDLE" in row and "2,048" in row and "/ 10:00" in row

    [entry] = [i for i in json.loads(run_cli("ps", "--json", server=srv).out) if i["identifier"] == "cli-chat"]
    assert entry["contextLength"] == 2048 and entry["parallel"] == 2 and entry["ttlMs"] == 600_000
    assert entry["status"] == "idle" and entry["queued"] == 0 and entry["lastUsedTime"] > 0

    again = run_cli("load", "acme/tiny-chat", "--identifier", "cli-chat", server=srv)
    assert again.code == 1 and "already loaded" in again.err

    gone = run_cli("unload", "cli-chat", server=srv)
    assert gone.code == 0 and gone.out == 'Unloaded "cli-chat".\n'
    missing = run_cli("unload", "cli-chat", server=srv)
    assert missing.code == 1 and 'No loaded instance "cli-chat"' in missing.err


def _hold_streams(srv: ServerProcess, count: int, started: threading.Barrier, stop: threading.Event) -> None:
    def one() -> None:
        body = {"model": LONG_MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 20000,
                "stream": True}
        with srv.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
            started.wait()
            for _ in response.iter_raw():
                if stop.is_set():
                    return
    for _ in range(count):
        threading.Thread(target=one, daemon=True).start()


def test_ps_json_while_generating(srv: ServerProcess) -> None:
    assert run_cli("load", LONG_MODEL, "-c", str(CONTEXT), "--parallel", "1", server=srv).code == 0
    started, stop = threading.Barrier(3), threading.Event()
    _hold_streams(srv, 2, started, stop)
    started.wait(timeout=60)
    try:
        [entry] = [i for i in json.loads(run_cli("ps", "--json", server=srv).out) if i["identifier"] == LONG_MODEL]
        assert entry["status"] in ("generating", "processingPrompt")
        assert (entry["queued"], entry["running"], entry["waiting"], entry["parallel"]) == (2, 1, 1, 1)
        text = run_cli("ps", server=srv).out
        assert "GENERATING" in text or "PROCESSINGPROMPT" in text
    finally:
        stop.set()
    deadline = time.monotonic() + 60
    while [i for i in instances(srv) if i["id"] == LONG_MODEL and i["status"] != "idle"]:
        assert time.monotonic() < deadline, "the instance never went back to idle"
        time.sleep(0.1)


def _follow(srv: ServerProcess, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([LMKUBE, "log", "stream", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=cli_env(srv))
    assert process.stderr is not None
    first = process.stderr.readline()  # printed once the server has subscribed this stream
    assert first.startswith("Streaming "), first + process.stderr.read()
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) == 0


def test_log_stream_model_json_with_stats(srv: ServerProcess) -> None:
    process = _follow(srv, "--json", "--stats")
    try:
        with srv.client() as client:
            response = client.post("/v1/chat/completions", json={
                "model": "acme/tiny-chat", "messages": [{"role": "user", "content": "hello logs"}], "max_tokens": 5})
        assert response.status_code == 200
        assert process.stdout is not None
        first, second = json.loads(process.stdout.readline()), json.loads(process.stdout.readline())
    finally:
        _stop(process)
    assert first["data"]["type"] == "llm.prediction.input" and "hello logs" in first["data"]["input"]
    assert first["data"]["modelIdentifier"] == "acme/tiny-chat" and first["timestamp"] > 0
    output = second["data"]
    assert output["type"] == "llm.prediction.output"
    assert output["output"] == response.json()["choices"][0]["message"]["content"]
    stats = output["stats"]
    assert stats["predictedTokensCount"] == 5 and stats["stopReason"] == "maxPredictedTokensReached"
    assert stats["promptTokensCount"] == response.json()["usage"]["prompt_tokens"]
    assert stats["tokensPerSecond"] > 0 and stats["timeToFirstTokenSec"] > 0


def test_log_stream_filter_and_text(srv: ServerProcess) -> None:
    process = _follow(srv, "--filter", "output")
    try:
        with srv.client() as client:
            client.post("/v1/chat/completions", json={
                "model": "acme/tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
    finally:
        _stop(process)
    assert lines[0].startswith("timestamp: ")
    assert lines[1] == "type: llm.prediction.output\n" and lines[2] == "modelIdentifier: acme/tiny-chat\n"
    assert lines[3] == "output:\n"


def test_log_stream_server_source(srv: ServerProcess) -> None:
    process = _follow(srv, "-s", "server", "--json")
    try:
        with srv.client() as client:
            assert client.get("/api/v1/models").status_code == 200
            assert client.get("/api/v1/nope").status_code == 404
        assert process.stdout is not None
        events = [json.loads(process.stdout.readline())["data"] for _ in range(2)]
    finally:
        _stop(process)
    assert [(e["method"], e["path"], e["status"]) for e in events] == [
        ("GET", "/api/v1/models", 200), ("GET", "/api/v1/nope", 404)]
    assert events[0]["type"] == "server.log" and events[0]["content"].startswith("GET /api/v1/models 200 ")
    assert events[0]["duration_ms"] >= 0


def test_colors_only_on_a_terminal_and_no_color(srv: ServerProcess) -> None:
    def on_tty(**extra: str) -> str:
        child = pexpect.spawn(LMKUBE, ["ls"], env=cli_env(srv, **extra), encoding="utf-8", timeout=60)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        return child.before

    assert ANSI in on_tty(TERM="xterm")
    plain = on_tty(TERM="xterm", NO_COLOR="1")
    assert ANSI not in plain and "acme/tiny-chat" in plain


def test_server_start_status_stop(tmp_path: Path, models_dir: Path) -> None:
    port = str(free_port())
    env = {"LMKUBE_HOME": str(tmp_path)}
    try:
        started = run_cli("server", "start", "-d", "--port", port, "--models-dir", str(models_dir), **env)
        assert started.code == 0, started.err
        assert started.out.startswith(f"Success! Server is now running on port {port}")
        status = json.loads(run_cli("server", "status", "--json", **env).out)
        assert status["running"] is True and status["port"] == int(port) and status["models"] == []
        os.kill(status["pid"], 0)
        assert run_cli("ls", "--port", port, **env).code == 0
        again = run_cli("server", "start", "-d", "--port", port, **env)
        assert again.code == 0 and "already running" in again.out
        assert "The server is running on port" in run_cli("server", "status", **env).out
    finally:
        stopped = run_cli("server", "stop", **env)
    assert stopped.code == 0 and stopped.out == f"Stopped the server on port {port}.\n"
    assert json.loads(run_cli("server", "status", "--json", **env).out) == {"running": False}
    assert run_cli("server", "stop", **env).out == "The server is not running.\n"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_load_with_a_draft_model(srv: ServerProcess) -> None:
    missing = run_cli("load", "acme/tiny-chat", "--identifier", "cli-drafted", "--draft-model", "acme/nope",
                      server=srv)
    assert missing.code == 1 and "acme/nope" in missing.err and len(missing.err.splitlines()) == 1

    loaded = run_cli("load", "acme/tiny-chat@f32", "--identifier", "cli-drafted", "-c", "1024",
                     "--draft-model", "acme/tiny-chat@f32", server=srv)
    assert loaded.code == 0, loaded.err
    try:
        with srv.client() as client:
            body = {"model": "cli-drafted", "prompt": "hello", "max_tokens": 8, "temperature": 0}
            stats = client.post("/v1/completions", json=body, timeout=60).json()["stats"]
        assert stats["draft_model"] == "acme/tiny-chat"
        assert stats["total_draft_tokens_count"] == (stats["accepted_draft_tokens_count"]
                                                     + stats["rejected_draft_tokens_count"]
                                                     + stats["ignored_draft_tokens_count"])
    finally:
        run_cli("unload", "cli-drafted", server=srv)
