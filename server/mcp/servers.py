"""MCP server specs: `$LMKUBE_HOME/mcp.json` entries (Cursor's and LM Studio's notation) and per-request URLs.

An entry is a stdio server (`command`, `args`, `env`, `cwd`: the server is started as a child process and
spoken to over its stdin/stdout) or a remote one (`url`, `headers`: Streamable HTTP). lmkube reads one
extra key: `timeout`, the seconds one tool call may take (the server's `--mcp-call-timeout` otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import APIError

MCP_JSON = "mcp.json"


@dataclass(frozen=True)
class ServerSpec:
    """How to reach one MCP server: `command` (stdio) or `url` (Streamable HTTP)."""

    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    call_timeout: float | None = None  # None: the server's default

    @property
    def stdio(self) -> bool:
        return self.command is not None

    def describe(self) -> str:
        """Where the server is, for messages (no headers or env: they hold secrets)."""
        if self.command is not None:
            return " ".join([self.command, *self.args])
        return self.url or "?"


def _invalid(message: str) -> APIError:
    return APIError(400, message, param="integrations", code="invalid_integration")


def string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _invalid(f"{where} must be an object of string values.")
    return dict(value)


def load_mcp_json(path: Path) -> dict[str, Any]:
    """The `mcpServers` of an mcp.json; {} when there is none."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise APIError(500, f"Cannot read {path}: {exc}", type="plugin_connection_error",
                       param="integrations", code="invalid_mcp_json") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    return servers if isinstance(servers, dict) else {}


def server_spec(name: str, entry: dict[str, Any]) -> ServerSpec:
    """One mcp.json entry as a spec; 400 naming what is wrong with it."""
    where = f"mcp.json server \"{name}\""
    timeout = entry.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise _invalid(f"{where}: \"timeout\" must be a positive number of seconds.")
    command = entry.get("command")
    if command is not None:
        args = entry.get("args") or []
        if not isinstance(command, str) or not command:
            raise _invalid(f"{where}: \"command\" must be a non-empty string.")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise _invalid(f"{where}: \"args\" must be an array of strings.")
        cwd = entry.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise _invalid(f"{where}: \"cwd\" must be a string.")
        return ServerSpec(command=command, args=tuple(args), env=string_map(entry.get("env"), f"{where}: \"env\""),
                          cwd=cwd, call_timeout=timeout)
    url = entry.get("url") or entry.get("serverUrl")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise _invalid(f"{where} has neither a \"command\" (a stdio server) nor an http(s) \"url\".")
    return ServerSpec(url=url, headers=string_map(entry.get("headers"), f"{where}: \"headers\""), call_timeout=timeout)
