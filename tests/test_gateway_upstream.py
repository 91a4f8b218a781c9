"""gateway/upstream.py, the HTTP/1.1 client the gateway relays inference with, against a real uvicorn server
(httptools + uvloop, as `lmkube serve` runs): keep-alive reuse, a pooled connection the server closed while
idle, a large answer read under backpressure, what arrived together read in one piece, closing mid-stream
(the server sees the disconnect), an answer broken off, a refused connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from lmkube.gateway.upstream import UpstreamBroken, UpstreamPool, UpstreamUnreachable
from support import free_port, uvicorn_in_thread, wait_until

KEEP_ALIVE_SECONDS = 1


class Upstream:
    """A raw ASGI app standing in for a replica; `disconnected` names the streams whose client went away."""

    def __init__(self) -> None:
        self.disconnected: set[str] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = dict(part.split("=", 1) for part in scope["query_string"].decode().split("&") if part)
        path = scope["path"]
        if path == "/echo":
            answer = orjson.dumps({"body": body.decode(), "port": scope["client"][1], "method": scope["method"],
                                   "target": path + "?" + scope["query_string"].decode(),
                                   "headers": {k.decode(): v.decode() for k, v in scope["headers"]}})
            await send({"type": "http.response.start", "status": 201,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"7")]})
            await send({"type": "http.response.body", "body": answer})
        elif path == "/big":
            size = int(query["size"])
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(size).encode())]})
            block = bytes(range(256)) * 256
            for start in range(0, size, len(block)):
                await send({"type": "http.response.body", "body": block[:size - start], "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/burst":  # several frames at once, then the end after a pause
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for i in range(5):
                await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            await asyncio.sleep(0.5)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        elif path == "/endless":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.add(query["name"])
        elif path == "/dies":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
            await asyncio.sleep(0.1)
            raise RuntimeError("the replica broke off its answer")  # uvicorn closes the connection mid-answer


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Upstream]]:
    app = Upstream()
    with uvicorn_in_thread(app, log_level="critical", timeout_keep_alive=KEEP_ALIVE_SECONDS) as url:
        yield url, app


async def _echo(pool: UpstreamPool, url: str, body: bytes = b'{"model": "m"}') -> dict[str, Any]:
    response = await pool.request(url, "POST", "/echo?x=1", [(b"authorization", b"Bearer pod-token")], body)
    assert response.status == 201
    assert response.header(b"retry-after") == b"7"
    answer: dict[str, Any] = orjson.loads(await response.aread())
    await response.aclose()
    return answer


def test_requests_reuse_one_kept_alive_connection(served: tuple[str, Upstream]) -> None:
    url, _ = served

    async def scenario() -> None:
        pool = UpstreamPool()
        first = await _echo(pool, url)
        second = await _echo(pool, url, b"x" * 100_000)
        assert first["port"] == second["port"]
        assert first["method"] == "POST" and first["target"] == "/echo?x=1"
        assert first["body"] == '{"model": "m"}' and len(second["body"]) == 100_000
        assert first["headers"]["authorization"] == "Bearer pod-token"
        assert first["headers"]["host"] == url.removeprefix("http://")
        await pool.aclose()

    asyncio.run(scenario())


def test_a_pooled_connection_the_server_closed_unseen_is_replaced(served: tuple[str, Upstream]) -> None:
    url, _ = served

    async def scenario() -> None:
        pool = UpstreamPool(idle_seconds=60)  # longer than the server's keep-alive: the pool would reuse it
        first = await _echo(pool, url)
        # Blocking, so the event loop does not see the server's close before the next request is written on it.
        time.sleep(KEEP_ALIVE_SECONDS + 1)
        second = await _echo(pool, url)
        assert second["port"] != first["port"]
        third = await _echo(pool, url)
        assert third["port"] == second["port"]
        assert pool.idle_count() == 1
        # Now the loop runs while the server closes it: the pool lets it go at once.
        await asyncio.sleep(KEEP_ALIVE_SECONDS + 1)
        assert pool.idle_count() == 0
        assert (await _echo(pool, url))["port"] != third["port"]
        await pool.aclose()

    asyncio.run(scenario())


def test_a_large_answer_arrives_whole_when_read_slowly(served: tuple[str, Upstream]) -> None:
    url, _ = served
    size = 3 * 1024 * 1024 + 17

    async def scenario() -> None:
        pool = UpstreamPool()
        response = await pool.request(url, "POST", f"/big?size={size}", [], b"")
        parts = []
        while (part := await response.read_some()) is not None:
            parts.append(part)
            await asyncio.sleep(0.01)  # a slow client: the replica's socket is paused meanwhile
        body = b"".join(parts)
        block = bytes(range(256)) * 256
        assert len(body) == size and body == (block * (size // len(block) + 1))[:size]
        assert max(len(p) for p in parts) <= 512 * 1024  # reading stopped near the pause threshold
        await response.aclose()
        assert (await _echo(pool, url))["body"]  # the connection was handed back whole and still works
        await pool.aclose()

    asyncio.run(scenario())


def test_what_arrived_together_is_read_in_one_piece(served: tuple[str, Upstream]) -> None:
    url, _ = served

    async def scenario() -> None:
        pool = UpstreamPool()
        response = await pool.request(url, "POST", "/burst", [], b"")
        assert response.header(b"content-type") == b"text/event-stream"
        await asyncio.sleep(0.3)
        assert await response.read_some() == b"".join(f"data: {i}\n\n".encode() for i in range(5))
        assert await response.read_some() == b"data: [DONE]\n\n"
        assert await response.read_some() is None
        await response.aclose()
        await pool.aclose()

    asyncio.run(scenario())


def test_closing_mid_stream_tells_the_server_the_client_left(served: tuple[str, Upstream]) -> None:
    url, app = served

    async def scenario() -> None:
        pool = UpstreamPool()
        response = await pool.request(url, "POST", "/endless?name=left", [], b"")
        assert await response.read_some() == b"data: first\n\n"
        await response.aclose()
        await pool.aclose()

    asyncio.run(scenario())
    wait_until(lambda: "left" in app.disconnected, timeout=10.0, interval=0.02)


def test_an_answer_broken_off_raises_upstream_broken(served: tuple[str, Upstream]) -> None:
    url, _ = served

    async def scenario() -> None:
        pool = UpstreamPool()
        response = await pool.request(url, "POST", "/dies", [], b"")
        assert response.status == 200
        assert await response.read_some() == b"data: first\n\n"
        with pytest.raises(UpstreamBroken, match="connection closed"):
            await asyncio.wait_for(response.read_some(), 10)
        await response.aclose()
        assert (await _echo(pool, url))["body"]  # a new connection for the next request
        await pool.aclose()

    asyncio.run(scenario())


def test_a_refused_connection_is_unreachable() -> None:
    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5)
        with pytest.raises(UpstreamUnreachable, match="cannot connect"):
            await pool.request(f"http://127.0.0.1:{free_port()}", "POST", "/v1/chat/completions", [], b"{}")

    asyncio.run(scenario())
