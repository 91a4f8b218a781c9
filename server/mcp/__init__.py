"""MCP servers as server-side tools for `/api/v1/chat` `integrations` and `/v1/responses` `mcp` tools
(the official `mcp` SDK): mcp.json servers (stdio or HTTP, sessions kept across requests) and
per-request HTTP servers."""

from .sessions import McpSessions
from .toolbox import (
    DEFAULT_CALL_TIMEOUT,
    MAX_TOOL_ROUNDS,
    Integration,
    McpTool,
    McpToolbox,
    ToolRun,
    Unavailable,
    open_toolbox,
    parse_integrations,
    unavailable_error,
)

__all__ = ["DEFAULT_CALL_TIMEOUT", "MAX_TOOL_ROUNDS", "Integration", "McpSessions", "McpTool", "McpToolbox",
           "ToolRun", "Unavailable", "open_toolbox", "parse_integrations", "unavailable_error"]
