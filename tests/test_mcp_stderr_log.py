"""A stdio MCP server's stderr in the server's log stream (`lmkube log stream --source server`, over
`GET /api/v1/logs/stream?source=server`): each line a `server.log` event prefixed with the server's label, long
lines cut, a burst beyond the rate limit dropped with one line saying how many. The server is
tests/mcp_stdio_test_server.py, started by lmkube from mcp.json with the `mcp` SDK's stdio client when a chat
request names it in `integrations`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_support import cli_env
from conftest import ServerFactory
from lmkube.server.mcp.stderr_log import BURST_LINES, LINES_PER_SECOND, MAX_LINE_BYTES
from support import LMKUBE, ServerProcess, wait_until

from lmkube.synthetic_gguf import write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
STDIO_SERVER = str(Path(__file__).parent / "mcp_stdio_test_server.py")
MODEL = "acme/qwen-tools"
TOKEN = "sk-lm-mcplogs0:secretsecret"
LONG_LINE = 10_000
BURST = 2_000


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("mcp-log-models")
    write_llama_model(models / "acme" / "qwen-tools" / "qwen-tools-F16.gguf", seed=5,
                      chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(),
                      extra_special_tokens=("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"))
    return models


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("mcp-log-home")
    noisy = {"command": sys.executable, "args": [STDIO_SERVER],
             "env": {"MCP_TEST_STDERR_LONG": str(LONG_LINE), "MCP_TEST_STDERR_BURST": str(BURST),
                     "MCP_TEST_PID_FILE": str(home / "noisy.pids")}}
    (home / "mcp.json").write_text(json.dumps({"mcpServers": {"noisy": noisy}}))
    return home


@pytest.fixture(scope="module")
def server(start_server: ServerFactory, models: Path, home: Path) -> ServerProcess:
    return start_server(models, "--api-token", TOKEN, token=TOKEN, env={"LMKUBE_HOME": str(home)})


class LogFollower:
    """`lmkube log stream --source server --json` (GET /api/v1/logs/stream?source=server), its events' `data`
    collected in a thread as they come."""

    def __init__(self, server: ServerProcess) -> None:
        self.events: list[dict[str, Any]] = []
        self._process = subprocess.Popen([LMKUBE, "log", "stream", "-s", "server", "--json"], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=cli_env(server))
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> LogFollower:
        assert self._process.stderr is not None
        first = self._process.stderr.readline()  # printed once the server has subscribed the stream
        assert first.startswith("Streaming "), first + self._process.stderr.read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.send_signal(signal.SIGINT)
        assert self._process.wait(timeout=15) == 0
        self._thread.join(15)

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.events.append(json.loads(line)["data"])

    def mcp_lines(self) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("mcpServer")]


@pytest.fixture
def follower(server: ServerProcess) -> Iterator[LogFollower]:
    with LogFollower(server) as follower:
        yield follower


def test_stderr_lines_reach_the_log_stream_with_the_servers_name_bounded(server: ServerProcess, home: Path,
                                                                         follower: LogFollower) -> None:
    body = {"model": MODEL, "input": "Hi", "integrations": ["mcp/noisy"], "max_output_tokens": 3}
    with server.client() as client:
        response = client.post("/api/v1/chat", json=body)
    assert response.status_code == 200, response.text
    [pid] = [int(p) for p in (home / "noisy.pids").read_text().split()]
    wait_until(lambda: any(e["content"] == "[mcp/noisy] burst over" for e in follower.mcp_lines()), timeout=30,
               message=f"no 'burst over' in the log stream: {follower.mcp_lines()[-5:]}")
    lines = follower.mcp_lines()
    assert all(e["type"] == "server.log" and e["mcpServer"] == "mcp/noisy" for e in lines), lines[:3]
    assert all(e["content"].startswith("[mcp/noisy] ") for e in lines), lines[:3]
    contents = [e["content"].removeprefix("[mcp/noisy] ") for e in lines]
    assert contents[0] == f"lmkube stdio test server {pid} started"
    # The long line: its first MAX_LINE_BYTES, and what was cut.
    assert contents[1] == "L" * MAX_LINE_BYTES + f" ... [{LONG_LINE - MAX_LINE_BYTES} more bytes cut]"
    # The burst: the first lines in order, until the rate limit (a burst of BURST_LINES, then LINES_PER_SECOND)
    # drops the rest. A slow machine writes the burst slowly enough for a later line to be let through again.
    # Whenever a line goes through after some were dropped, one warning just before it says how many went.
    burst = [int(c.removeprefix("burst ")) for c in contents if c.startswith("burst ") and c != "burst over"]
    head = BURST_LINES - 2  # the two lines before it took from the same budget
    assert burst[:head] == list(range(head)) and burst == sorted(set(burst)), burst
    assert head <= len(burst) < BURST, len(burst)
    warnings = [i for i, e in enumerate(lines) if "dropped" in e["content"]]
    assert warnings and all(lines[i]["level"] == "warn" for i in warnings)
    counts = [int(lines[i]["content"].removeprefix("[mcp/noisy] ... ").split()[0]) for i in warnings]
    assert all(lines[i]["content"] == f"[mcp/noisy] ... {n} lines dropped (more than {LINES_PER_SECOND:g} lines/s)"
               for i, n in zip(warnings, counts, strict=True))
    assert sum(counts) == BURST - len(burst), (counts, len(burst))
    assert all(contents[i + 1].startswith("burst ") for i in warnings)  # each followed by the line let through
    # The same lines are in the server's own log, under the MCP server's logger.
    log = server.log()
    assert "lmkube.server.mcp.server.mcp/noisy" in log and "burst over" in log
    assert "L" * (MAX_LINE_BYTES + 1) not in log
