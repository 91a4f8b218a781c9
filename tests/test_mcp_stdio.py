"""stdio MCP servers from mcp.json (tests/mcp_stdio_test_server.py, started by lmkube with the `mcp` SDK's
stdio client) on /api/v1/chat: the tool loop, one process for many requests, a crash and the restart,
a hanging tool that times out, allowed_tools, a changed tool list, the idle close and the shutdown.
The model is a random-weight Qwen2.5-template model whose first round is forced to call a tool with the
lmkube `tool_choice` extension."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support import ServerProcess, free_port, wait_until

from lmkube.synthetic_gguf import write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
STDIO_SERVER = str(Path(__file__).parent / "mcp_stdio_test_server.py")
MODEL = "acme/qwen-tools"
TOKEN = "sk-lm-mcpstdio:secretsecret"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("mcp-stdio-models")
    write_llama_model(models / "acme" / "qwen-tools" / "qwen-tools-F16.gguf", seed=5,
                      chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(),
                      extra_special_tokens=("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"))
    return models


def stdio_entry(pid_file: Path, **extra: object) -> dict:
    return {"command": sys.executable, "args": [STDIO_SERVER], "env": {"MCP_TEST_PID_FILE": str(pid_file)}, **extra}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("mcp-stdio-home")
    workdir = home / "work"
    workdir.mkdir()
    servers = {name: stdio_entry(home / f"{name}.pids") for name in ("crashy", "fragile", "grower", "idle", "slow")}
    servers["fragile"]["env"]["MCP_TEST_REFUSE_IF_EXISTS"] = str(home / "fragile.refuse")
    servers["stdio"] = stdio_entry(home / "stdio.pids", cwd=str(workdir))
    servers["stdio"]["env"]["MCP_TEST_GREETING"] = "hello-from-env"
    servers["slow"]["timeout"] = 3
    servers["broken"] = {"command": str(home / "no-such-mcp-server"), "args": []}
    port = free_port()
    (home / "remote.port").write_text(str(port))
    servers["remote"] = {"url": f"http://127.0.0.1:{port}/mcp"}  # started and stopped by its test
    (home / "mcp.json").write_text(json.dumps({"mcpServers": servers}))
    return home


@pytest.fixture(scope="module")
def server(start_server, models: Path, home: Path) -> ServerProcess:
    return start_server(models, "--api-token", TOKEN, token=TOKEN, env={"LMKUBE_HOME": str(home)})


def pids(home: Path, name: str) -> list[int]:
    path = home / f"{name}.pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def chat(server: ServerProcess, plugin: str, tool: str | None = None, **extra) -> httpx.Response:
    """A request forced to call `tool` (any of the allowed ones when None) on the mcp.json server `plugin`."""
    integration = {"type": "plugin", "id": f"mcp/{plugin}", "allowed_tools": [tool] if tool else None}
    choice = {"type": "function", "function": {"name": tool}} if tool else "required"
    body = {"model": MODEL, "input": "What is 2 + 3?", "integrations": [integration], "temperature": 0,
            "max_output_tokens": 100, "tool_choice": choice, **extra}
    with server.client() as client:
        return client.post("/api/v1/chat", json=body)


def first_call(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    calls = [item for item in response.json()["output"] if item["type"] in ("tool_call", "invalid_tool_call")]
    assert calls, response.json()
    return calls[0]


def test_one_process_serves_many_requests(server: ServerProcess, home: Path) -> None:
    for _ in range(3):
        call = first_call(chat(server, "stdio", "add"))
        assert call["type"] == "tool_call" and call["tool"] == "add"
        assert call["output"] == str(call["arguments"]["a"] + call["arguments"]["b"])  # computed by the server
        assert call["provider_info"] == {"type": "plugin", "plugin_id": "mcp/stdio"}
    call = first_call(chat(server, "stdio", "whoami"))
    [pid] = pids(home, "stdio")  # four requests, one process start
    assert call["output"] == f"pid {pid} hello-from-env cwd {home / 'work'}"  # mcp.json's env and cwd
    assert running(pid)
    # The server's stderr is in lmkube's log, under a logger of its own.
    wait_until(lambda: f"lmkube stdio test server {pid} started" in server.log(), timeout=10)
    assert "lmkube.server.mcp.server.mcp/stdio" in server.log()


def test_concurrent_requests_share_the_session(server: ServerProcess, home: Path) -> None:
    with ThreadPoolExecutor(3) as pool:
        calls = list(pool.map(lambda _: first_call(chat(server, "stdio", "whoami")), range(3)))
    [pid] = pids(home, "stdio")
    assert [call["output"].split()[:2] for call in calls] == [["pid", str(pid)]] * 3


def test_allowed_tools_narrow_what_the_model_is_offered(server: ServerProcess) -> None:
    integration = {"type": "plugin", "id": "mcp/stdio", "allowed_tools": ["whoami"]}
    body = {"model": MODEL, "input": "Who are you?", "integrations": [integration], "temperature": 0,
            "max_output_tokens": 60, "tool_choice": "required", "stream": True}
    with server.client() as client, client.stream("POST", "/api/v1/chat", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    started = [e["tool"] for e in events if e["type"] == "tool_call.start"]
    assert started and set(started) == {"whoami"}
    # A forced call of a tool outside allowed_tools is refused before anything runs.
    response = chat(server, "stdio", None, tool_choice={"type": "function", "function": {"name": "add"}},
                    integrations=[integration])
    assert response.status_code == 400, response.text


def test_crash_is_a_failed_call_and_the_next_call_restarts_the_server(server: ServerProcess, home: Path) -> None:
    call = first_call(chat(server, "crashy", "crash"))
    assert call["type"] == "invalid_tool_call"
    assert "crash" in call["reason"] and "closed" in call["reason"], call
    assert call["metadata"]["tool_name"] == "crash"
    assert call["metadata"]["provider_info"] == {"type": "plugin", "plugin_id": "mcp/crashy"}
    [crashed] = pids(home, "crashy")
    wait_until(lambda: not running(crashed), timeout=30, message="the crashed server is still there")
    call = first_call(chat(server, "crashy", "whoami"))
    assert call["type"] == "tool_call", call
    [_, restarted] = pids(home, "crashy")
    assert call["output"].startswith(f"pid {restarted}") and restarted != crashed
    assert "mcp/crashy: session ended" in server.log()


def test_a_server_that_cannot_restart_fails_its_calls(server: ServerProcess, home: Path) -> None:
    assert first_call(chat(server, "fragile", "add"))["type"] == "tool_call"
    (home / "fragile.refuse").touch()
    assert first_call(chat(server, "fragile", "crash"))["type"] == "invalid_tool_call"
    # It cannot start again: the request still gets its last tool list, and the call fails with the reason.
    call = first_call(chat(server, "fragile", "add"))
    assert call["type"] == "invalid_tool_call", call
    assert call["reason"].startswith("Error calling tool add: ConnectionError:"), call
    assert call["metadata"]["provider_info"] == {"type": "plugin", "plugin_id": "mcp/fragile"}
    assert "refusing to start" in server.log()
    (home / "fragile.refuse").unlink()
    # Once it can start again, the next call (after the back-off) restarts it.
    wait_until(lambda: first_call(chat(server, "fragile", "add"))["type"] == "tool_call", timeout=60, interval=1)


def start_http_mcp_server(port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "mcp_test_server.py"), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def listening() -> bool:
        assert process.poll() is None, "the MCP server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        wait_until(listening, timeout=30)
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    return process


def test_a_kept_http_session_is_started_again_after_the_server_restarts(server: ServerProcess, home: Path) -> None:
    port = int((home / "remote.port").read_text())
    process = start_http_mcp_server(port)
    try:
        assert first_call(chat(server, "remote", "add"))["type"] == "tool_call"
        process.terminate()
        process.wait(10)
        call = first_call(chat(server, "remote", "add"))  # the kept session's tools; the call fails
        assert call["type"] == "invalid_tool_call" and "add" in call["reason"], call
        process = start_http_mcp_server(port)
        wait_until(lambda: first_call(chat(server, "remote", "add"))["type"] == "tool_call", timeout=60, interval=1)
    finally:
        process.terminate()
        process.wait(10)


def test_a_hanging_tool_times_out_as_a_failed_call(server: ServerProcess) -> None:
    started = time.monotonic()
    body = {"model": MODEL, "input": "Wait", "integrations": [{"type": "plugin", "id": "mcp/slow"}],
            "temperature": 0, "max_output_tokens": 60, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "hang"}}}
    with server.client() as client, client.stream("POST", "/api/v1/chat", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - started < 100
    names = [e["type"] for e in events]
    assert names[-1] == "chat.end" and "error" not in names
    failure = next(e for e in events if e["type"] == "tool_call.failure")
    assert "timed out" in failure["reason"] and "3 s" in failure["reason"]  # mcp.json's "timeout": 3
    assert failure["metadata"]["tool_name"] == "hang"
    output = events[-1]["result"]["output"]
    assert any(item["type"] == "invalid_tool_call" and item["reason"] == failure["reason"] for item in output)
    # The session survives a timed-out call.
    assert first_call(chat(server, "slow", "add"))["type"] == "tool_call"


def test_a_changed_tool_list_is_listed_again(server: ServerProcess) -> None:
    assert first_call(chat(server, "grower", "grow"))["output"] == "grown"
    # The server sent notifications/tools/list_changed; the kept session lists its tools again.
    def extra_offered() -> bool:
        response = chat(server, "grower", "extra")
        return response.status_code == 200 and first_call(response).get("output") == "extra!"
    wait_until(extra_offered, timeout=30, interval=0.5)


def test_a_server_that_cannot_start(server: ServerProcess, home: Path) -> None:
    response = chat(server, "broken")
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "plugin_connection_error" and "mcp/broken" in error["message"]
    assert "no-such-mcp-server" in error["message"]
    assert chat(server, "stdio", "add").status_code == 200  # the others are unaffected
    # Not forced to call a tool, the chat goes on without the server's tools, and says why.
    body = {"model": MODEL, "input": "Hi", "integrations": ["mcp/broken", "mcp/stdio"], "max_output_tokens": 5,
            "stream": True}
    with server.client() as client, client.stream("POST", "/api/v1/chat", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    [failure] = [e for e in events if e["type"] == "tool_call.failure"]
    assert "mcp/broken" in failure["reason"] and "no-such-mcp-server" in failure["reason"]
    assert events[-1]["type"] == "chat.end" and "error" not in [e["type"] for e in events]
    output = events[-1]["result"]["output"]
    assert output[0] == {"type": "invalid_tool_call", **{k: v for k, v in failure.items() if k != "type"}}


def test_idle_sessions_close_and_shutdown_stops_the_servers(start_server, models: Path, home: Path) -> None:
    # Its own LMKUBE_HOME: mcp.json comes from --mcp-json (how a LocalModel's mounted ConfigMap is read).
    server = start_server(models, "--api-token", TOKEN, "--mcp-idle-timeout", "2", "--mcp-json",
                          str(home / "mcp.json"), token=TOKEN)
    assert first_call(chat(server, "idle", "add"))["type"] == "tool_call"
    [first] = pids(home, "idle")
    wait_until(lambda: not running(first), timeout=30, message="the idle server was not stopped")
    assert "mcp/idle: session closed after" in server.log()
    assert first_call(chat(server, "idle", "add"))["type"] == "tool_call"  # started again on use
    [_, second] = pids(home, "idle")
    assert running(second)
    server.stop()
    wait_until(lambda: not running(second), timeout=30, message="the server outlived lmkube")
    assert not os.path.exists(f"/proc/{second}/cmdline") or not running(second)
