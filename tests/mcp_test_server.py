"""A real MCP server for tests/test_mcp.py: the `mcp` SDK's MCPServer over Streamable HTTP.

Run as `python tests/mcp_test_server.py PORT` (serves http://127.0.0.1:PORT/mcp). Its `secret` tool
answers only when the request carried the header `X-Test-Key: open-sesame`.
"""

from __future__ import annotations

import sys
from typing import Annotated

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

server = MCPServer("lmkube-test")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def shout(text: Annotated[str, Field(max_length=8)]) -> str:  # short: a random-weight model must finish it
    """Upper-case a text."""
    return text.upper()


@server.tool()
def secret(ctx: Context) -> str:
    """Tells whether the request was authorized by a header."""
    request = ctx.request_context.request
    key = request.headers.get("x-test-key") if request is not None else None
    return "granted" if key == "open-sesame" else "denied"


def main() -> None:
    port = int(sys.argv[1])
    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
