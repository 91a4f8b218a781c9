"""The sessions with the servers of `mcp.json`, kept across requests (`app.state.mcp_sessions`).

One session per configured server, started on its first use and reused by every request after it, so
a stdio server is one process for many requests and its tool list is listed once (then again on
`notifications/tools/list_changed`). A session that ends on its own (the process exited, the HTTP
stream broke) is started again on the next use, after a back-off that doubles with each consecutive
failure (a session that ran for `STABLE_SECONDS` starts the count again). A session no request has used
for `idle_timeout` seconds is closed; all are closed at shutdown. While a server that ran before cannot
be started again, requests are offered its last tool list, and their calls fail with the reason.
Per-request (ephemeral) servers are not kept here: the request's toolbox opens and closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from .connection import McpConnection
from .servers import ServerSpec

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0  # seconds before the first restart after a failure; doubled for each further one
BACKOFF_MAX = 30.0
BACKOFF_WAIT = 5.0  # a request waits out a back-off this short; a longer one fails its call at once
STABLE_SECONDS = 60.0  # a session that lived this long ended by accident, not in a crash loop


class ManagedServer:
    """One mcp.json server's session across requests. `users` counts the requests holding it (an idle
    close waits for them); `starts` counts the sessions started (process starts for a stdio server)."""

    def __init__(self, name: str, spec: ServerSpec, *, call_timeout: float) -> None:
        self.name = name
        self.label = f"mcp/{name}"
        self.spec = spec
        self.call_timeout = call_timeout
        self.connection: McpConnection | None = None
        self.starts = 0
        self.failures = 0  # consecutive crashes and failed starts
        self.retry_at = 0.0
        self.users = 0
        self.last_used = time.monotonic()
        self.last_tools: list[Any] = []  # the last session's tool list, offered while the server is down
        self._lock = asyncio.Lock()

    def hold(self) -> None:
        self.users += 1
        self.last_used = time.monotonic()

    def release(self) -> None:
        self.users -= 1
        self.last_used = time.monotonic()

    def _failed(self, at: float) -> None:
        self.failures += 1
        self.retry_at = at + min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)

    def _account_end(self, connection: McpConnection) -> None:
        """Books a session that ended by itself (not closed by us) as a failure, for the back-off."""
        if connection.error is None or connection.ended_at is None:
            return
        if connection.ended_at - connection.started_at >= STABLE_SECONDS:
            self.failures = 0
        self._failed(connection.ended_at)

    async def connect(self) -> McpConnection:
        """The live session, started (or restarted) when there is none; ConnectionError saying why not."""
        async with self._lock:
            connection = self.connection
            if connection is not None and connection.alive:
                return connection
            if connection is not None:
                self.connection = None
                self.last_tools = connection.tools
                await connection.close()  # it is ending already; this waits for it (a process is gone)
                self._account_end(connection)
            wait = self.retry_at - time.monotonic()
            if wait > BACKOFF_WAIT:
                raise ConnectionError(f"the server failed {self.failures} times in a row; next start in {wait:.0f} s")
            if wait > 0:
                await asyncio.sleep(wait)
            self.starts += 1
            connection = McpConnection(self.label, self.spec, call_timeout=self.call_timeout)
            try:
                await connection.start()
            except ConnectionError:
                self._failed(time.monotonic())
                raise
            log.info("MCP server %s: session started (%s), %d tools", self.label, self.spec.describe(),
                     len(connection.tools))
            self.connection = connection
            return connection

    async def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            self.last_tools = connection.tools
            await connection.close()


class McpSessions:
    """Every mcp.json server's `ManagedServer`, by name, and the task that closes idle sessions."""

    def __init__(self, *, call_timeout: float, idle_timeout: float) -> None:
        self.call_timeout = call_timeout
        self.idle_timeout = idle_timeout
        self.servers: dict[str, ManagedServer] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._retired: dict[asyncio.Task[None], ManagedServer] = {}

    def server(self, name: str, spec: ServerSpec) -> ManagedServer:
        """The server named `name` in mcp.json; an edited entry gets a new session (the old one closes
        once its requests are done)."""
        server = self.servers.get(name)
        if server is None or server.spec != spec:
            if server is not None:
                self._retire(server)
            server = self.servers[name] = ManagedServer(name, spec, call_timeout=self.call_timeout)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._close_idle(), name="mcp-idle-sessions")
        return server

    def _retire(self, server: ManagedServer) -> None:
        async def close_when_unused() -> None:
            while server.users > 0:
                await asyncio.sleep(0.5)
            await server.close()

        task = asyncio.create_task(close_when_unused())
        self._retired[task] = server
        task.add_done_callback(lambda done: self._retired.pop(done, None))

    async def _close_idle(self) -> None:
        interval = max(min(self.idle_timeout / 4, 5.0), 0.1)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for server in list(self.servers.values()):
                connection = server.connection
                if (connection is not None and connection.alive and server.users == 0
                        and now - server.last_used >= self.idle_timeout):
                    log.info("MCP server %s: session closed after %.0f s unused", server.label, now - server.last_used)
                    await server.close()

    async def close(self) -> None:
        """Closes every session (at shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
            self._reaper = None
        for task in list(self._retired):
            task.cancel()
        servers = [*self.servers.values(), *self._retired.values()]
        self._retired = {}
        self.servers = {}
        await asyncio.gather(*(server.close() for server in servers), return_exceptions=True)
