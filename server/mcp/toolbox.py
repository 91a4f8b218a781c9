"""Integrations → MCP sessions → OpenAI-format function tools, and calls back to the MCP servers.

An integration is an ephemeral MCP server named in the request (`{"type": "ephemeral_mcp", ...}`,
needs `--allow-remote-mcp`; Streamable HTTP; its session lasts the request) or a plugin naming a
server in `$LMKUBE_HOME/mcp.json` (`"mcp/<name>"` or `{"type": "plugin", "id": ...}`, needs API
tokens; stdio or HTTP; its session is kept across requests by `McpSessions`). `allowed_tools`
narrows what the model is offered on either. A call that fails, times out or finds its server gone
(and not startable again) is a `ToolRun` with an error, for the tool loop to report as a failed call. A
server that cannot be reached or started when the request begins (and has never listed its tools) is
left out of the request's toolbox with the reason, which the family reports as a failed item; neither
is an HTTP error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import APIError
from .connection import McpConnection, describe
from .servers import MCP_JSON, ServerSpec, load_mcp_json, server_spec, string_map
from .sessions import ManagedServer, McpSessions

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 8  # model rounds that may call tools; one more round without tools then answers
DEFAULT_CALL_TIMEOUT = 120.0  # seconds for one tool call (--mcp-call-timeout)


@dataclass(frozen=True)
class Integration:
    kind: str  # "ephemeral_mcp" | "plugin"
    label: str  # server_label, or the plugin id ("mcp/<name>")
    spec: ServerSpec
    allowed_tools: frozenset[str] | None

    @property
    def url(self) -> str | None:
        return self.spec.url

    @property
    def headers(self) -> dict[str, str]:
        return self.spec.headers

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


def parse_integrations(items: Sequence[str | dict[str, Any]], *, home: Path, allow_remote: bool,
                       has_tokens: bool, mcp_json: Path | None = None) -> list[Integration]:
    """Validates the request's `integrations` against the server's settings (400/403 on refusal).
    Plugins are read from `mcp_json`, by default `home`/mcp.json."""
    mcp_json = mcp_json or home / MCP_JSON
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
            spec = ServerSpec(url=url, headers=string_map(item.get("headers"), f"{where}.headers"))
            result.append(Integration("ephemeral_mcp", label, spec, _allowed_tools(item.get("allowed_tools"), where)))
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
                servers = load_mcp_json(mcp_json)
            entry = servers.get(name)
            if not isinstance(entry, dict):
                raise _invalid(f"Plugin \"{plugin_id}\" not found: no server \"{name}\" in "
                               f"{mcp_json} (known: {', '.join(sorted(servers)) or 'none'}).",
                               "plugin_not_found")
            result.append(Integration("plugin", plugin_id, server_spec(name, entry),
                                      _allowed_tools(item.get("allowed_tools"), where)))
        else:
            raise _invalid(f"{where}: expected a plugin id string, {{\"type\": \"plugin\", ...}} or "
                           f"{{\"type\": \"ephemeral_mcp\", ...}}, got type {kind!r}.")
    return result


class ToolSource(Protocol):
    """Where a request's tools of one integration come from, and where their calls go."""

    integration: Integration
    tools: list[Any]

    async def call(self, name: str, arguments: dict[str, Any]) -> Any: ...

    async def close(self) -> None: ...


class _RequestSession:
    """An ephemeral server's session, for this request only."""

    def __init__(self, integration: Integration, call_timeout: float) -> None:
        self.integration = integration
        self.connection = McpConnection(integration.label, integration.spec, call_timeout=call_timeout)
        self.tools: list[Any] = []

    async def open(self) -> None:
        await self.connection.start()
        self.tools = self.connection.tools

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        return await self.connection.call(name, arguments)

    async def close(self) -> None:
        await self.connection.close()


class _KeptSession:
    """A hold on an mcp.json server's kept session: tools as listed when the request began; a call
    restarts the session if it has ended since."""

    def __init__(self, integration: Integration, server: ManagedServer) -> None:
        self.integration = integration
        self.server = server
        self.tools: list[Any] = []
        self._held = False

    async def open(self) -> None:
        self.server.hold()
        self._held = True
        try:
            self.tools = list((await self.server.connect()).tools)
        except ConnectionError as exc:
            if not self.server.last_tools:
                raise
            # It ran before: its calls fail with the reason, as failed tool calls the model and client see.
            log.warning("MCP server %s is down (%s); offering its last tool list", self.server.label, exc)
            self.tools = list(self.server.last_tools)

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        connection = await self.server.connect()
        return await connection.call(name, arguments)

    async def close(self) -> None:
        if self._held:
            self._held = False
            self.server.release()


@dataclass(frozen=True)
class McpTool:
    name: str  # the name the model is given (unique across the request's servers)
    tool: str  # the MCP server's name for it
    description: str
    input_schema: dict[str, Any]
    source: ToolSource = field(repr=False)

    @property
    def integration(self) -> Integration:
        return self.source.integration

    @property
    def provider_info(self) -> dict[str, str]:
        return self.source.integration.provider_info

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
    protocol: bool = False  # the error is the call's (it timed out, the server is gone), not the tool's own


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


@dataclass(frozen=True)
class Unavailable:
    """An integration whose server could not be reached or started when the request began."""

    integration: Integration
    reason: str


class McpToolbox:
    """The request's MCP tools, and the integrations left out because their server is unavailable.
    `close()` ends its own sessions and lets go of the kept ones."""

    def __init__(self, sources: list[ToolSource], unavailable: Sequence[Unavailable] = ()) -> None:
        self.sources = sources
        self.unavailable = list(unavailable)
        self.tools: dict[str, McpTool] = {}
        for source in sources:
            allowed = source.integration.allowed_tools
            for tool in source.tools:
                if allowed is not None and tool.name not in allowed:
                    continue
                name = tool.name
                if name in self.tools:  # the same name on two servers: qualify the later one
                    name = f"{source.integration.label}_{tool.name}"
                schema = getattr(tool, "input_schema", None) or {"type": "object", "properties": {}}
                self.tools[name] = McpTool(name, tool.name, tool.description or "", dict(schema), source)

    def openai_tools(self) -> list[dict[str, Any]]:
        return [tool.openai_tool() for tool in self.tools.values()]

    async def call(self, tool: McpTool, arguments: dict[str, Any]) -> ToolRun:
        try:
            result = await tool.source.call(tool.tool, arguments)
        except TimeoutError as exc:
            message = f"Tool {tool.tool} timed out: {exc}"
            return ToolRun(message, error=message, protocol=True)
        except Exception as exc:
            message = f"Error calling tool {tool.tool}: {describe(exc)}"
            return ToolRun(message, error=message, protocol=True)
        text = _result_text(result)
        if getattr(result, "is_error", False):
            return ToolRun(text, error=text or f"Tool {tool.tool} failed.")
        return ToolRun(text)

    async def close(self) -> None:
        await asyncio.gather(*(source.close() for source in self.sources), return_exceptions=True)


async def open_toolbox(integrations: Sequence[Integration], *, sessions: McpSessions | None = None,
                       call_timeout: float = DEFAULT_CALL_TIMEOUT) -> McpToolbox:
    """Starts (or reuses) every integration's session and lists its tools. Plugins' sessions are
    `sessions`' (else this request's). A server that cannot be reached or started is left out, with the
    reason in `unavailable`, for the family to report (the request goes on without its tools)."""
    opened: list[ToolSource] = []
    unavailable: list[Unavailable] = []
    for integration in integrations:
        source: _RequestSession | _KeptSession
        if integration.kind == "plugin" and sessions is not None:
            source = _KeptSession(integration, sessions.server(integration.label.removeprefix("mcp/"),
                                                                integration.spec))
        else:
            source = _RequestSession(integration, call_timeout)
        try:
            await source.open()
        except Exception as exc:
            await source.close()
            what = f"plugin \"{integration.label}\"" if integration.kind == "plugin" \
                else f"MCP server \"{integration.label}\""
            reason = f"Cannot connect to {what} at {integration.spec.describe()}: {describe(exc)}"
            log.warning("%s", reason)
            unavailable.append(Unavailable(integration, reason))
            continue
        opened.append(source)
    return McpToolbox(opened, unavailable)


def unavailable_error(toolbox: McpToolbox) -> APIError:
    """The first unavailable server as an HTTP error (for a request that cannot go on without it)."""
    first = toolbox.unavailable[0]
    return APIError(502, first.reason, type=first.integration.error_type, param="integrations",
                    code=first.integration.error_type)
