"""The HTTP/1.1 client the gateway relays inference requests with: asyncio protocols, httptools' C parser,
one keep-alive pool per replica.

Every token of every stream crosses here, so it does the least per chunk that relaying allows: the parser
decodes the replica's chunked framing in C and hands over the payload; whatever has arrived since the relay
last looked goes out in one piece (`read_some` never waits for more than one byte, so nothing is held back).
httpx (httpcore, h11 in pure Python, anyio) cost several times more CPU per chunk, and on a small node the
gateway shares the cores with the model server. The gateway's other upstream calls (model lists, stored
responses, scaling) are rare and stay on httpx. httptools is also the parser uvicorn[standard] serves with.

Replicas are plain `http://host:port` (pods inside the cluster). An idle connection is reused for at most
`idle_seconds` (below uvicorn's 5 s keep-alive, so the server does not close it while a request is on its
way); a reused connection that fails before the answer's first byte is retried once on a fresh one (the
server had closed it unseen, so it never saw the request).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools

Headers = list[tuple[bytes, bytes]]

READ_PAUSE_BYTES = 256 * 1024  # unread answer bytes above which the replica's socket is not read (backpressure)


class UpstreamUnreachable(Exception):
    """No answer began: the connection was refused, timed out or broke before the status line."""


class UpstreamBroken(Exception):
    """The answer had begun and its connection broke (or its framing was invalid) before the end."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a replica; one request at a time. Also the parser's callback object."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self.idle_in: deque[_Connection] | None = None  # the pool's queue it waits in, while idle
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is not a registered subclass

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        self.response._began = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.response._fail(f"invalid HTTP from the replica: {exc}")
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_in is not None:  # closed by the server while idle (or its pod went): out of the pool
            with contextlib.suppress(ValueError):
                self.idle_in.remove(self)
            self.idle_in = None
        if self.response is not None:
            self.response._lost(exc)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- httptools callbacks (the response that is being read)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response._head(self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._complete()

    # --

    async def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if self._writable is not None:  # a large body: wait until the socket takes it (or the connection ends)
            await self._writable

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A replica's answer: `status` and `headers` once `UpstreamPool.request` returns, the body as it comes."""

    def __init__(self, connection: _Connection, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self._connection = connection
        self._pool = pool
        self._key = key
        self.status = 0
        self.headers: Headers = []
        self._keep_alive = False
        self._began = False  # any byte of the answer arrived
        self._headed: asyncio.Future[None] = connection.loop.create_future()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._complete_body = False
        self._error: str | None = None
        self._released = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header, by lower-case name."""
        return next((v for k, v in self.headers if k.lower() == name), None)

    # -- fed by the connection

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _head(self, status: int, keep_alive: bool) -> None:
        self.status, self._keep_alive = status, keep_alive
        if not self._headed.done():
            self._headed.set_result(None)

    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_PAUSE_BYTES and not self._paused and self._connection.transport is not None:
            self._paused = True
            self._connection.transport.pause_reading()
        self._wake()

    def _complete(self) -> None:
        self._complete_body = True
        self._wake()

    def _fail(self, message: str) -> None:
        if self._error is None and not self._complete_body:
            self._error = message
        if not self._headed.done():
            self._headed.set_exception(UpstreamUnreachable(message))
        self._wake()

    def _lost(self, exc: Exception | None) -> None:
        if self._complete_body:
            return
        if self._headed.done() and not self._headed.exception() and self._no_framing():
            self._complete()  # an answer without length or chunking ends when its connection does
            return
        self._fail("connection closed" + (f": {exc}" if exc else ""))

    def _no_framing(self) -> bool:
        return self.header(b"content-length") is None and self.header(b"transfer-encoding") is None

    # -- read by the relay

    async def read_some(self) -> bytes | None:
        """What has arrived since the last call, at once if anything has (else the next piece); None at the end.
        Raises UpstreamBroken when the connection broke first."""
        while not self._chunks:
            if self._complete_body:
                self._release()
                return None
            if self._error is not None:
                raise UpstreamBroken(self._error)
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            if self._connection.transport is not None:
                self._connection.transport.resume_reading()
        return data

    async def aread(self) -> bytes:
        parts = []
        while (part := await self.read_some()) is not None:
            parts.append(part)
        return b"".join(parts)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._connection.response = None
        if self._complete_body and self._keep_alive and not self._connection.closed:
            self._pool._put(self._key, self._connection)
        else:
            self._connection.close()

    async def aclose(self) -> None:
        """Done with the answer: a complete one's connection goes back to the pool; one still streaming is
        closed, which is how the replica learns that the client went away (and frees the slot)."""
        self._release()


class UpstreamPool:
    def __init__(self, connect_timeout: float = 5.0, idle_seconds: float = 4.0, max_idle: int = 256) -> None:
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._addresses: dict[str, tuple[str, int]] = {}

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def _address(self, base_url: str) -> tuple[str, int]:
        address = self._addresses.get(base_url)
        if address is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"replica URL {base_url!r}: the gateway relays to http://host:port only")
            if len(self._addresses) > 4096:  # pods come and go
                self._addresses.clear()
            address = self._addresses[base_url] = (parts.hostname, parts.port or 80)
        return address

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if idle is None:
            return None
        oldest = time.monotonic() - self.idle_seconds
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been closed
            connection.idle_in = None
            if not connection.closed and connection.idle_since >= oldest:
                return connection
            connection.close()
        del self._idle[key]  # none left (a replica that went away leaves no entry behind once asked again)
        return None

    def _put(self, key: tuple[str, int], connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        if key not in self._idle and len(self._idle) >= 64:  # drop the queues of replicas that went away
            self._idle = {k: v for k, v in self._idle.items() if v}
        idle = self._idle.setdefault(key, deque())
        idle.append(connection)
        connection.idle_in = idle
        while len(idle) > self.max_idle:
            oldest = idle.popleft()
            oldest.idle_in = None
            oldest.close()

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), key[0], key[1]), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"cannot connect to {key[0]}:{key[1]}: {exc or type(exc).__name__}") from exc
        return connection

    async def request(self, base_url: str, method: str, target: str, headers: Headers,
                      body: bytes) -> UpstreamResponse:
        """Sends the request; returns once the answer's status and headers are in (the body still streams)."""
        key = self._address(base_url)
        host = key[0] if key[1] == 80 else f"{key[0]}:{key[1]}"
        head = [f"{method} {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n".encode("latin-1")]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"\r\n")
        message = b"".join(head) + body
        for attempt in range(2):
            connection = self._take(key) if attempt == 0 else None
            reused = connection is not None
            if connection is None:
                connection = await self._connect(key)
            response = UpstreamResponse(connection, self, key)
            connection.response = response
            try:
                await connection.write(message)
                await response._headed
            except UpstreamUnreachable:
                connection.response = None
                connection.close()
                if reused and not response._began and attempt == 0:
                    continue  # the server had closed the idle connection: it never saw this request
                raise
            except BaseException:
                connection.response = None
                connection.close()  # cancelled (the client left): the replica sees the connection close
                raise
            return response
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                connection = idle.pop()
                connection.idle_in = None
                connection.close()
        self._idle.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)  # let the transports run their close callbacks
