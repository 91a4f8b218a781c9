"""GET /api/v1/logs/stream: the server's log events as SSE (an lmkube extension behind `lmkube log stream`;
LM Studio's `lms log stream` reads the same events over its SDK socket)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson

from ...errors import APIError
from ...logs import BUS, SOURCES, Source
from ...streaming import EventStreamResponse

_KEEPALIVE_S = 15.0  # a comment line now and then keeps proxies from closing a quiet stream


async def stream_logs(source: str = "model") -> EventStreamResponse:
    if source not in SOURCES:
        raise APIError(400, f"Unknown log source '{source}'; expected one of: {', '.join(SOURCES)}.", param="source")
    return EventStreamResponse(_events(source))


async def _events(source: Source) -> AsyncIterator[bytes]:
    with BUS.subscribe(source) as queue:
        # Subscribed before the first byte: a client that saw this comment misses no later event.
        yield b": subscribed " + source.encode() + b"\n\n"
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            yield b"data: " + orjson.dumps(event) + b"\n\n"
