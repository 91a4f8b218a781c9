"""server/streaming.py's EventStreamResponse under a real uvicorn server (httptools + uvloop, as `lmkube serve`
runs it): a client that leaves cancels the producer at once, wherever it waits, the producer's generator is
closed, and the request still ends as an ordinary 200 for the request observers; a stream that runs to its end
is written whole.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from lmkube.server.request_observer import FinishedRequest, RequestObserverMiddleware
from lmkube.server.streaming import EventStreamResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from support import uvicorn_in_thread, wait_until


@dataclass
class Record:
    """What the server side saw, written on the event loop thread, read by the test thread."""

    closed: dict[str, str] = field(default_factory=dict)  # stream name -> how its generator ended
    finished: list[FinishedRequest] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def make_app(record: Record) -> RequestObserverMiddleware:
    async def frames(name: str, count: int | None) -> AsyncIterator[bytes]:
        """`count` frames then the end, or (None) one frame and then waits forever, like a log stream."""
        try:
            for i in range(count if count is not None else 1):
                yield f"data: {name} {i}\n\n".encode()
            if count is None:
                await asyncio.Event().wait()
            record.closed[name] = "finished"
        except asyncio.CancelledError:
            record.closed[name] = "cancelled"
            raise
        except GeneratorExit:
            record.closed[name] = "closed"
            raise

    async def endless(request: Request) -> EventStreamResponse:
        return EventStreamResponse(frames(request.query_params["name"], None))

    async def finite(request: Request) -> EventStreamResponse:
        return EventStreamResponse(frames(request.query_params["name"], int(request.query_params["count"])))

    def observe(finished: FinishedRequest) -> None:
        record.finished.append(finished)
        record.done.set()

    app = Starlette(routes=[Route("/endless", endless), Route("/finite", finite)])
    return RequestObserverMiddleware(app, [observe])


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Record]]:
    record = Record()
    with uvicorn_in_thread(make_app(record)) as url:
        yield url, record


def test_a_finished_stream_is_written_whole(served: tuple[str, Record]) -> None:
    url, record = served
    record.done.clear()
    response = httpx.get(f"{url}/finite", params={"name": "whole", "count": 50}, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text == "".join(f"data: whole {i}\n\n" for i in range(50))
    assert record.done.wait(5)
    assert record.closed["whole"] == "finished"
    assert record.finished[-1].status == 200 and record.finished[-1].path == "/finite"


def test_a_client_that_leaves_cancels_the_waiting_producer(served: tuple[str, Record]) -> None:
    url, record = served
    for round_ in range(3):  # the same connection-level path, several times: nothing left behind in between
        name = f"gone-{round_}"
        record.done.clear()
        with httpx.Client(timeout=10) as client, client.stream("GET", f"{url}/endless", params={"name": name}) as r:
            assert r.status_code == 200
            first = next(r.iter_raw())
            assert first == f"data: {name} 0\n\n".encode()
        # The producer waits on something that never comes; only the disconnect can end it.
        assert record.done.wait(5), "the request never ended after its client left"
        wait_until(lambda name=name: name in record.closed, timeout=5.0, interval=0.01)
        assert record.closed[name] == "cancelled"
        assert record.finished[-1].status == 200 and record.finished[-1].path == "/endless"


def test_a_cancellation_from_elsewhere_is_not_swallowed() -> None:
    """Only the disconnect watcher's own cancellation ends the response quietly; a server shutting down (or any
    other canceller) still sees its CancelledError, and the producer's generator is closed either way."""
    record = Record()

    async def frames() -> AsyncIterator[bytes]:
        try:
            yield b"data: 0\n\n"
            await asyncio.Event().wait()
        finally:
            record.closed["elsewhere"] = "closed"

    async def main() -> None:
        sent: list[dict[str, object]] = []
        never = asyncio.Event()

        async def receive() -> dict[str, object]:
            await never.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        task = asyncio.ensure_future(EventStreamResponse(frames())({"type": "http"}, receive, send))
        while len(sent) < 2:  # the start and the first frame
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sent[1]["body"] == b"data: 0\n\n"

    asyncio.run(main())
    assert record.closed["elsewhere"] == "closed"
