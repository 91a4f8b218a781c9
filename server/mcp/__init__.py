"""MCP servers as server-side tools for `/api/v1/chat` `integrations` (the official `mcp` SDK)."""

from .toolbox import MAX_TOOL_ROUNDS, McpTool, McpToolbox, ToolRun, open_toolbox, parse_integrations

__all__ = ["MAX_TOOL_ROUNDS", "McpTool", "McpToolbox", "ToolRun", "open_toolbox", "parse_integrations"]
