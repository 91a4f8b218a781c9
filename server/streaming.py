"""Streaming responses that notice a vanished client at once, and a disconnect guard for the rest.

Starlette only notices a disconnect when a write fails, so a request still waiting for a free slot
would hold its place in the queue after its client left. Both helpers here listen for
`http.disconnect` while the work runs and cancel it, which frees the request's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

# A named SSE event before encoding: its name and its JSON fields (Anthropic, Responses, LM Studio chat).
SseEvent = tuple[str, dict[str, Any]]

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientDisconnected(Exception):
    pass


def sse_event(name: str, data: Mapping[str, object]) -> bytes:
    """One named SSE frame whose JSON data repeats the name as `type` (Anthropic, Responses, LM Studio chat)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(receive: Receive, producer: asyncio.Task[object]) -> bool:
    """Cancels `producer` as soon as the client disconnects; True once it has."""
    await _wait_for_disconnect(receive)
    producer.cancel()
    return True


class EventStreamResponse(StreamingResponse):
    """Writes `chunks` (already-encoded SSE bytes) as they come; stops the producer on disconnect.

    A plain asyncio watcher task rather than an anyio task group: the group's scopes and wrapper task cost
    more than the rest of a short request's streaming. On disconnect the watcher cancels the task writing the
    response, wherever it waits (for the engine, or for a slow socket); that cancellation ends here.
    """

    def __init__(self, chunks: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(chunks, headers={**SSE_HEADERS, **(headers or {})}, media_type="text/event-stream")
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, task))
        try:
            try:
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the socket went away mid-write
                pass
            finally:
                # First, so a disconnect noticed from here on no longer cancels this task (e.g. while closing).
                watcher.cancel()
                await _close(self.chunks)
        except asyncio.CancelledError:
            # Ours (the client left) ends quietly, as a write to a closed socket would; anyone else's goes on.
            if not (watcher.done() and not watcher.cancelled() and watcher.result()) or task.uncancel() > 0:
                raise


async def _close(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`; if the client disconnects first, cancels it and raises ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
