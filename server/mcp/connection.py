"""One MCP client session (the official `mcp` SDK) over stdio or Streamable HTTP, owned by its own task.

The SDK's transports and `ClientSession` hold anyio task groups, which must be entered and left in one
task, while the requests that use the session run in others: so each connection runs in a task of its
own (`_run`), and callers send requests on the session from their tasks (the SDK correlates them).
A relay between the transport and the session notices when the server goes away (a stdio server that
exits, a closed HTTP stream): the connection then ends, and pending calls fail with "Connection closed".
A stdio server's stderr goes to lmkube's log and the log stream, a line per record (stderr_log.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .servers import ServerSpec
from .stderr_log import StderrForwarder

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0  # seconds to start (or reach) a server, initialize and list its tools


def describe(exc: BaseException) -> str:
    """An exception as one line (the first leaf of an exception group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    message = getattr(exc, "message", None)  # the SDK's MCPError: its args are (code, message, data)
    if isinstance(message, str) and message:
        return f"{type(exc).__name__}: {message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@asynccontextmanager
async def _stdio(label: str, spec: ServerSpec) -> AsyncIterator[Any]:
    from mcp.client.stdio import StdioServerParameters, stdio_client

    assert spec.command is not None
    params = StdioServerParameters(command=spec.command, args=list(spec.args), env=spec.env or None, cwd=spec.cwd)
    read_fd, write_fd = os.pipe()
    forwarder = StderrForwarder(label, asyncio.get_running_loop())
    threading.Thread(target=forwarder.run, args=(read_fd,), daemon=True, name=f"mcp-stderr:{label}").start()
    errlog = os.fdopen(write_fd, "w")
    try:
        async with stdio_client(params, errlog=errlog) as streams:
            errlog.close()  # the child has its copy; the reader sees EOF once the child's is closed too
            yield streams
    finally:
        errlog.close()


@asynccontextmanager
async def _http(spec: ServerSpec, call_timeout: float) -> AsyncIterator[Any]:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    assert spec.url is not None
    timeout = httpx2.Timeout(call_timeout + 5, connect=CONNECT_TIMEOUT)
    async with (
        httpx2.AsyncClient(headers=spec.headers, timeout=timeout) as http,
        streamable_http_client(spec.url, http_client=http) as streams,
    ):
        yield streams


class McpConnection:
    """A session with one MCP server: `start()` connects and lists the tools, `call()` runs one, `close()`
    ends it. `tools` follows the server's `notifications/tools/list_changed`; `ended` is set when the
    session is over, for whatever reason (`error` says which, None after `close()`)."""

    def __init__(self, label: str, spec: ServerSpec, *, call_timeout: float) -> None:
        self.label = label
        self.spec = spec
        self.call_timeout = spec.call_timeout or call_timeout
        self.tools: list[Any] = []
        self.error: str | None = None
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.ended = asyncio.Event()
        self._session: Any = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = asyncio.Event()  # the session task has something to do: stop, or list the tools again
        self._stopping = False
        self._stale = False
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._session is not None and self.error is None and not self.ended.is_set()

    async def start(self) -> None:
        """Starts (or reaches) the server and lists its tools; ConnectionError saying why it could not."""
        self._task = asyncio.create_task(self._run(), name=f"mcp:{self.label}")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), CONNECT_TIMEOUT)
        except TimeoutError:
            await self.close()
            raise ConnectionError(f"no answer within {CONNECT_TIMEOUT:g} s") from None

    def _transport(self) -> Any:
        return _stdio(self.label, self.spec) if self.spec.stdio else _http(self.spec, self.call_timeout)

    async def _message(self, message: Any) -> None:
        """Server notifications (the SDK's message handler): a changed tool list is listed again."""
        method = getattr(getattr(message, "root", message), "method", None)
        if method == "notifications/tools/list_changed":
            self._stale = True
            self._wake.set()

    async def _list_tools(self, session: Any) -> list[Any]:
        from mcp import types

        tools: list[Any] = []
        cursor = None
        while True:
            page = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            listing = await session.list_tools(params=page)
            tools.extend(listing.tools)
            cursor = getattr(listing, "next_cursor", None)
            if not cursor:
                return tools

    async def _run(self) -> None:
        import anyio
        from mcp import ClientSession

        try:
            async with self._transport() as (read, write), anyio.create_task_group() as relays:
                inbox_send, inbox = anyio.create_memory_object_stream[Any](0)

                async def relay() -> None:
                    async with inbox_send:
                        async for item in read:
                            await inbox_send.send(item)
                    self._broken("the server closed the connection")

                relays.start_soon(relay)
                async with ClientSession(inbox, write, message_handler=self._message) as session:
                    await session.initialize()
                    self.tools = await self._list_tools(session)
                    self._session = session
                    self._ready.set_result(None)
                    while True:
                        await self._wake.wait()
                        self._wake.clear()
                        if self._stopping or self.error is not None:
                            break
                        if self._stale:
                            self._stale = False
                            self.tools = await self._list_tools(session)
                            log.info("MCP server %s: tool list changed (%d tools)", self.label, len(self.tools))
                relays.cancel_scope.cancel()
        except BaseException as exc:
            if not self._stopping:
                self.error = self.error or describe(exc)
            if not self._ready.done():
                self._ready.set_exception(ConnectionError(self.error or describe(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._session = None
            self.ended_at = time.monotonic()
            if not self._ready.done():
                self._ready.set_exception(ConnectionError(self.error or "the session ended"))
            self.ended.set()
            if self.error is not None and not self._stopping:
                log.warning("MCP server %s: session ended: %s", self.label, self.error)

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        """The server's result for one tool call; TimeoutError past the call timeout, ConnectionError when
        the session is over, the SDK's MCPError for a protocol error."""
        session = self._session
        if session is None or self.ended.is_set():
            raise ConnectionError(self.error or "the MCP session has closed")
        try:
            return await asyncio.wait_for(session.call_tool(name, arguments, read_timeout_seconds=self.call_timeout),
                                          self.call_timeout + 5)
        except TimeoutError:
            raise TimeoutError(f"no result within {self.call_timeout:g} s") from None
        except Exception as exc:
            from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

            code = getattr(exc, "code", None)
            if code == REQUEST_TIMEOUT:
                raise TimeoutError(f"no result within {self.call_timeout:g} s") from None
            import anyio

            if code == CONNECTION_CLOSED or isinstance(exc, OSError | anyio.ClosedResourceError
                                                       | anyio.BrokenResourceError):  # the transport failed
                # An HTTP server that went away leaves the session's streams open but useless: end it,
                # so that the next use starts a new one.
                self._broken(self.error or "the server closed the connection")
                raise ConnectionError(self.error) from None
            raise

    def _broken(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self._wake.set()

    async def close(self) -> None:
        """Ends the session (a stdio server's stdin is closed, then it is stopped as the SDK does)."""
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is None or task.done():
            self.ended.set()
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        except (TimeoutError, Exception):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
