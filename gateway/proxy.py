"""The streaming reverse proxy to one replica.

The answer is passed on as it arrives (upstream.py: the payload as the replica framed it, no SSE decoding;
what arrived together goes out together, nothing waits for more), with the replica's status and headers
(Retry-After, content type, ...). While it streams, a second task waits for the client to go away; when it
does, the upstream connection is closed, and the model server frees the slot at once. A replica that dies
mid-answer ends a stream with the family's own error event (what the server itself sends when generation
fails); a non-streamed answer's connection is aborted, so the client's SDK raises at once: never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .catalog import Replica
from .errors import stream_error_event
from .upstream import UpstreamBroken, UpstreamPool, UpstreamResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Hop-by-hop headers (RFC 9110 7.6.1) and what the gateway sets itself.
_REQUEST_DROP = frozenset({b"host", b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                           b"transfer-encoding", b"upgrade", b"content-length", b"authorization", b"x-api-key",
                           b"expect"})
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                            b"transfer-encoding", b"upgrade", b"date", b"server"})
REPLICA_HEADER = b"x-lmkube-replica"


class UpstreamDied(Exception):
    """The replica's connection broke after the answer had begun. `answered`: the client already got the
    family's error event and a complete response; otherwise its connection must be aborted."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


def upstream_headers(scope: Scope, token: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(k, v) for k, v in scope["headers"] if k not in _REQUEST_DROP]
    if token:
        # Clients never see pod tokens: the gateway's own credential, which every pod also accepts.
        headers.append((b"authorization", b"Bearer " + token.encode()))
    return headers


class Proxy:
    def __init__(self, pool: UpstreamPool, upstream_token: str | None) -> None:
        self.pool = pool
        self.upstream_token = upstream_token

    async def open(self, replica: Replica, scope: Scope, body: bytes, path: str | None = None) -> UpstreamResponse:
        """Sends the request; returns once the replica's status and headers are in (the body still streams).
        Raises UpstreamUnreachable when no answer began."""
        target = path or scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        return await self.pool.request(replica.url, scope["method"], target,
                                       upstream_headers(scope, self.upstream_token), body)

    async def relay(self, upstream: UpstreamResponse, replica: Replica, scope: Scope, gone: asyncio.Future[None],
                    send: Send, on_chunk: Callable[[bytes], None] | None = None) -> bool:
        """Passes the answer on. False when the client went away first (`gone`, see `client_gone`): the
        upstream is closed at once. Raises UpstreamDied when the replica broke off its answer."""
        pump = asyncio.ensure_future(self._pump(upstream, replica, scope, send, on_chunk))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()
                return True
            return False
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            await upstream.aclose()

    async def _pump(self, upstream: UpstreamResponse, replica: Replica, scope: Scope, send: Send,
                    on_chunk: Callable[[bytes], None] | None) -> None:
        headers = [(k, v) for k, v in upstream.headers if k.lower() not in _RESPONSE_DROP]
        headers.append((REPLICA_HEADER, replica.name.encode()))
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        streaming = (upstream.header(b"content-type") or b"").startswith(b"text/event-stream")
        try:
            while (chunk := await upstream.read_some()) is not None:
                if on_chunk is not None:
                    on_chunk(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamBroken as exc:
            if not streaming:
                raise UpstreamDied(str(exc), answered=False) from exc
            message = f"The model's replica {replica.name} stopped answering mid-stream ({exc})."
            await send({"type": "http.response.body", "body": stream_error_event(scope["path"], message),
                        "more_body": False})
            raise UpstreamDied(message, answered=True) from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def client_gone(receive: Receive) -> asyncio.Future[None]:
    """Done when the client disconnects. Started once the request body is read, so it also covers the wait
    for the replica's first byte (a non-streamed answer comes whole, after the whole generation)."""
    return asyncio.ensure_future(_wait_for_disconnect(receive))
