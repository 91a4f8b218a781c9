"""A real stdio MCP server for the tests (the `mcp` SDK's MCPServer), started by lmkube from an mcp.json entry
such as `{"command": sys.executable, "args": ["tests/mcp_stdio_test_server.py"], "env": {...}}`.

Each start appends its pid to `$MCP_TEST_PID_FILE` (when set), so that a test counts process starts, and
writes a line to stderr (which lmkube logs); it refuses to start while `$MCP_TEST_REFUSE_IF_EXISTS`
exists. `$MCP_TEST_STDERR_LONG` (bytes) and `$MCP_TEST_STDERR_BURST` (lines) make it write one long line and
then a burst of numbered lines to stderr at start, and after a second's pause the line `burst over`.
Tools: `add`, `whoami` (the pid, `$MCP_TEST_GREETING` and the working directory), `crash` (the process exits
at once), `hang` (never answers), `grow` (adds the tool `extra` and sends
`notifications/tools/list_changed`).
"""

from __future__ import annotations

import os
import sys
import time

import anyio
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("lmkube-stdio-test")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def whoami() -> str:
    """Tells the server's process id and its greeting."""
    return f"pid {os.getpid()} {os.environ.get('MCP_TEST_GREETING', '')} cwd {os.getcwd()}".strip()


@server.tool()
def crash() -> str:
    """Ends the server process."""
    print("crashing on purpose", file=sys.stderr, flush=True)
    os._exit(3)


@server.tool()
async def hang() -> str:
    """Never answers (the server stays responsive to other calls)."""
    await anyio.sleep(3600)
    return "late"


def extra() -> str:
    """A tool added at run time."""
    return "extra!"


@server.tool()
async def grow(ctx: Context) -> str:
    """Adds the tool `extra` and tells the client that the tool list changed."""
    server.add_tool(extra)
    await ctx.session.send_tool_list_changed()
    return "grown"


def main() -> None:
    refuse = os.environ.get("MCP_TEST_REFUSE_IF_EXISTS")
    if refuse and os.path.exists(refuse):
        print(f"refusing to start: {refuse} exists", file=sys.stderr, flush=True)
        sys.exit(1)
    pid_file = os.environ.get("MCP_TEST_PID_FILE")
    if pid_file:
        with open(pid_file, "a") as out:
            out.write(f"{os.getpid()}\n")
    print(f"lmkube stdio test server {os.getpid()} started", file=sys.stderr, flush=True)
    noisy_start()
    server.run("stdio")


def noisy_start() -> None:
    long_bytes, burst = int(os.environ.get("MCP_TEST_STDERR_LONG", 0)), int(os.environ.get("MCP_TEST_STDERR_BURST", 0))
    if long_bytes:
        print("L" * long_bytes, file=sys.stderr, flush=True)
    if burst:
        sys.stderr.write("".join(f"burst {i}\n" for i in range(burst)))
        sys.stderr.flush()
        time.sleep(1)
        print("burst over", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
