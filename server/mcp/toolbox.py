"""Integrations → MCP sessions → OpenAI-format function tools, and calls back to the MCP servers.

An integration is an ephemeral MCP server named in the request (`{"type": "ephemeral_mcp", ...}`,
needs `--allow-remote-mcp`) or a plugin naming a server in `$LMKUBE_HOME/mcp.json`
(`"mcp/<name>"` or `{"type": "plugin", "id": ...}`, needs API tokens). Only HTTP servers (Streamable
HTTP transport) are supported.

Each server's session lives in its own asyncio task for the whole request: the SDK's transport holds
an anyio task group, which must be entered and left in one task, while the chat loop that uses the
tools runs inside an async generator that yields between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import APIError

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 8  # model rounds that may call tools; one more round without tools then answers
CONNECT_TIMEOUT = 15.0  # seconds to connect, initialize and list tools
CALL_TIMEOUT = 120.0  # seconds for one tool call


@dataclass(frozen=True)
class Integration:
    kind: str  # "ephemeral_mcp" | "plugin"
    label: str  # server_label, or the plugin id ("mcp/<name>")
    url: str
    headers: dict[str, str]
    allowed_tools: frozenset[str] | None

    @property
    def provider_info(self) -> dict[str, str]:
        if self.kind == "plugin":
            return {"type": "plugin", "plugin_id": self.label}
        return {"type": "ephemeral_mcp", "server_label": self.label}

    @property
    def error_type(self) -> str:
        return "plugin_connection_error" if self.kind == "plugin" else "mcp_connection_error"


def _invalid(message: str, code: str = "invalid_integration") -> APIError:
    return APIError(400, message, param="integrations", code=code)


def _forbidden(message: str, code: str) -> APIError:
    return APIError(403, message, param="integrations", code=code)


def _allowed_tools(value: Any, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"{where}.allowed_tools must be an array of tool names.")
    return frozenset(value)


def _headers(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _invalid(f"{where}.headers must be an object of string values.")
    return dict(value)


def load_mcp_json(home: Path) -> dict[str, Any]:
    """`$LMKUBE_HOME/mcp.json`'s `mcpServers` (Cursor / LM Studio format); {} when there is none."""
    path = home / "mcp.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise APIError(500, f"Cannot read {path}: {exc}", type="plugin_connection_error",
                       param="integrations", code="invalid_mcp_json") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    return servers if isinstance(servers, dict) else {}


def parse_integrations(items: Sequence[str | dict[str, Any]], *, home: Path, allow_remote: bool,
                       has_tokens: bool) -> list[Integration]:
    """Validates the request's `integrations` against the server's settings (400/403 on refusal)."""
    result: list[Integration] = []
    servers: dict[str, Any] | None = None
    for index, item in enumerate(items):
        where = f"integrations[{index}]"
        if isinstance(item, str):
            item = {"type": "plugin", "id": item}
        kind = item.get("type")
        if kind == "ephemeral_mcp":
            if not allow_remote:
                raise _forbidden("Per-request MCP servers (ephemeral_mcp) are disabled on this server; start it "
                                 "with --allow-remote-mcp to allow them.", "remote_mcp_disabled")
            label, url = item.get("server_label"), item.get("server_url")
            if not isinstance(label, str) or not label:
                raise _invalid(f"{where}.server_label must be a non-empty string.")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise _invalid(f"{where}.server_url must be an http:// or https:// URL.")
            result.append(Integration("ephemeral_mcp", label, url, _headers(item.get("headers"), where),
                                      _allowed_tools(item.get("allowed_tools"), where)))
        elif kind == "plugin":
            plugin_id = item.get("id")
            if not isinstance(plugin_id, str) or not plugin_id:
                raise _invalid(f"{where}.id must be a non-empty string such as \"mcp/<name>\".")
            if not has_tokens:
                raise _forbidden("Calling MCP servers from mcp.json requires API authentication: start the server "
                                 "with --api-token (or LMKUBE_API_TOKENS).", "mcp_json_requires_auth")
            name = plugin_id.removeprefix("mcp/")
            if plugin_id == name:
                raise _invalid(f"Plugin \"{plugin_id}\" not found: only MCP plugins (\"mcp/<name>\") are supported.",
                               "plugin_not_found")
            if servers is None:
                servers = load_mcp_json(home)
            entry = servers.get(name)
            if not isinstance(entry, dict):
                raise _invalid(f"Plugin \"{plugin_id}\" not found: no server \"{name}\" in "
                               f"{home / 'mcp.json'} (known: {', '.join(sorted(servers)) or 'none'}).",
                               "plugin_not_found")
            url = entry.get("url") or entry.get("serverUrl")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise _invalid(f"Plugin \"{plugin_id}\" is not an HTTP MCP server (it has no http(s) \"url\"); only "
                               "HTTP servers are supported.", "plugin_not_supported")
            result.append(Integration("plugin", plugin_id, url, _headers(entry.get("headers"), f"mcp.json {name}"),
                                      _allowed_tools(item.get("allowed_tools"), where)))
        else:
            raise _invalid(f"{where}: expected a plugin id string, {{\"type\": \"plugin\", ...}} or "
                           f"{{\"type\": \"ephemeral_mcp\", ...}}, got type {kind!r}.")
    return result


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    exc = _first_error(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Connection:
    """One MCP session, owned by its own task; `call` sends requests to it."""

    def __init__(self, integration: Integration) -> None:
        self.integration = integration
        self.tools: list[Any] = []
        self._requests: asyncio.Queue[tuple[str, dict[str, Any], asyncio.Future[Any]] | None] = asyncio.Queue()
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"mcp:{integration.label}")

    async def _run(self) -> None:
        import httpx2
        from mcp import ClientSession, types
        from mcp.client.streamable_http import streamable_http_client

        pending: asyncio.Future[Any] | None = None
        try:
            timeout = httpx2.Timeout(CALL_TIMEOUT, connect=CONNECT_TIMEOUT)
            async with (
                httpx2.AsyncClient(headers=self.integration.headers, timeout=timeout) as http,
                streamable_http_client(self.integration.url, http_client=http) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                cursor = None
                while True:
                    page = types.PaginatedRequestParams(cursor=cursor) if cursor else None
                    listing = await session.list_tools(params=page)
                    self.tools.extend(listing.tools)
                    cursor = getattr(listing, "next_cursor", None)
                    if not cursor:
                        break
                self._ready.set_result(None)
                while (request := await self._requests.get()) is not None:
                    name, arguments, pending = request
                    try:
                        result = await session.call_tool(name, arguments)
                    except Exception as exc:
                        if not pending.done():
                            pending.set_exception(exc)
                    else:
                        if not pending.done():
                            pending.set_result(result)
                    pending = None
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc if isinstance(exc, Exception) else ConnectionError(_describe(exc)))
            if pending is not None and not pending.done():
                pending.set_exception(ConnectionError(_describe(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.info("MCP server %s closed: %s", self.integration.label, _describe(exc))
        finally:
            while not self._requests.empty():
                request = self._requests.get_nowait()
                if request is not None and not request[2].done():
                    request[2].set_exception(ConnectionError("the MCP session has closed"))

    async def wait_ready(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), CONNECT_TIMEOUT)
        except TimeoutError:
            raise ConnectionError(f"no answer within {CONNECT_TIMEOUT:g} s") from None

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        if self._task.done():
            raise ConnectionError("the MCP session has closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._requests.put((name, arguments, future))
        return await asyncio.wait_for(future, CALL_TIMEOUT + 5)

    async def close(self) -> None:
        if self._task.done():
            return
        self._requests.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 5)
        except (TimeoutError, Exception):
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


@dataclass(frozen=True)
class McpTool:
    name: str  # the name the model is given (unique across the request's servers)
    tool: str  # the MCP server's name for it
    description: str
    input_schema: dict[str, Any]
    connection: _Connection = field(repr=False)

    @property
    def provider_info(self) -> dict[str, str]:
        return self.connection.integration.provider_info

    def openai_tool(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.input_schema}}

    def parse_arguments(self, raw: str | None) -> dict[str, Any] | str:
        """The model's arguments for this tool as a JSON object, or the message saying why they are not one."""
        try:
            arguments = json.loads(raw or "{}")
        except ValueError:
            arguments = None
        if isinstance(arguments, dict):
            return arguments
        return f"Invalid arguments for tool {self.tool}: expected a JSON object, got {raw!r}."


@dataclass
class ToolRun:
    """One executed call: `output` is the text given back to the model; `error` is set when it failed."""

    output: str
    error: str | None = None


def _result_text(result: Any) -> str:
    parts: list[str] = []
    for item in getattr(result, "content", None) or []:
        text = getattr(item, "text", None)
        if isinstance(text, str):
            parts.append(text)
        else:
            dump = item.model_dump(mode="json", exclude_none=True) if hasattr(item, "model_dump") else str(item)
            parts.append(dump if isinstance(dump, str) else json.dumps(dump))
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


class McpToolbox:
    """The request's MCP tools. `close()` ends every session."""

    def __init__(self, connections: list[_Connection]) -> None:
        self.connections = connections
        self.tools: dict[str, McpTool] = {}
        for connection in connections:
            allowed = connection.integration.allowed_tools
            for tool in connection.tools:
                if allowed is not None and tool.name not in allowed:
                    continue
                name = tool.name
                if name in self.tools:  # the same name on two servers: qualify the later one
                    name = f"{connection.integration.label}_{tool.name}"
                schema = getattr(tool, "input_schema", None) or {"type": "object", "properties": {}}
                self.tools[name] = McpTool(name, tool.name, tool.description or "", dict(schema), connection)

    def openai_tools(self) -> list[dict[str, Any]]:
        return [tool.openai_tool() for tool in self.tools.values()]

    async def call(self, tool: McpTool, arguments: dict[str, Any]) -> ToolRun:
        try:
            result = await tool.connection.call(tool.tool, arguments)
        except Exception as exc:
            message = f"Error calling tool {tool.tool}: {_describe(exc)}"
            return ToolRun(message, error=message)
        text = _result_text(result)
        if getattr(result, "is_error", False):
            return ToolRun(text, error=text or f"Tool {tool.tool} failed.")
        return ToolRun(text)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.connections), return_exceptions=True)


async def open_toolbox(integrations: Sequence[Integration]) -> McpToolbox:
    """Connects to every integration and lists its tools; an unreachable server is a 502 naming it."""
    connections = [_Connection(i) for i in integrations]
    toolbox = McpToolbox([])
    toolbox.connections = connections
    for connection in connections:
        try:
            await connection.wait_ready()
        except Exception as exc:
            await toolbox.close()
            info = connection.integration
            what = f"plugin \"{info.label}\"" if info.kind == "plugin" else f"MCP server \"{info.label}\""
            raise APIError(502, f"Cannot connect to {what} at {info.url}: {_describe(exc)}",
                           type=info.error_type, param="integrations", code=info.error_type) from None
    return McpToolbox(connections)
