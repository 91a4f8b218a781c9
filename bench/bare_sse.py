"""The floor under lmkube's streaming: the least a Python server on uvicorn can do per streamed token.

    .venv/bin/python bench/bare_sse.py --port PORT

A raw ASGI app (no FastAPI, no middleware, no validation) served by uvicorn with the same loop and HTTP parser
lmkube gets (uvloop, httptools). A producer thread stands in for the engine: every `step_ms` (a field of each
request, default 1) it gives every open stream one token and hands the step to the event loop with one
`call_soon_threadsafe`, as lmkube's engine thread does. Each stream's task wakes, frames its tokens as
`/v1/completions` chunks (orjson) and sends them; the last chunk carries `usage` and `[DONE]`, so
`oai_load.burst` checks it like a real server. Whatever the request's path, it streams.

`stream_overhead.py` runs it at the pace lmkube's engine stepped in the same cell, so both pay the same
wake-ups from idle: the difference is what lmkube's own stack costs per token.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Sequence

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send

FRAME_OPEN = b'data: {"id":"bare","object":"text_completion","model":"bare","choices":[{"index":0,"text":'
FRAME_CLOSE = b',"logprobs":null,"finish_reason":null}]}\n\n'


class Stream:
    __slots__ = ("left", "pending", "waiter")

    def __init__(self, tokens: int) -> None:
        self.left = tokens
        self.pending = 0  # tokens given and not yet written
        self.waiter: asyncio.Future[None] | None = None


class Producer:
    """Steps every open stream once per `step_s`, as the engine thread does, and wakes the loop once per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.step_s = 0.001
        self.streams: list[Stream] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.step_s)
            with self.lock:
                stepped = self.streams
                for stream in stepped:
                    stream.left -= 1
                self.streams = [s for s in stepped if s.left > 0]
            if stepped:
                self.loop.call_soon_threadsafe(_deliver, stepped)


def _deliver(streams: list[Stream]) -> None:
    for stream in streams:
        stream.pending += 1
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_result(None)


class BareSSE:
    def __init__(self) -> None:
        self.producer: Producer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "GET":  # servers.wait_ready polls /v1/models
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"object":"list","data":[]}'})
            return
        request = orjson.loads(body)
        if self.producer is None:
            self.producer = Producer(asyncio.get_running_loop())
        await self._stream(send, request["max_tokens"], float(request.get("step_ms", 1.0)) / 1000)

    async def _stream(self, send: Send, tokens: int, step_s: float) -> None:
        assert self.producer is not None
        stream = Stream(tokens)
        with self.producer.lock:
            self.producer.step_s = step_s
            self.producer.streams.append(stream)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        loop = asyncio.get_running_loop()
        written = 0
        while written < tokens:
            while not stream.pending:
                stream.waiter = loop.create_future()
                await stream.waiter
                stream.waiter = None
            count, stream.pending = stream.pending, 0
            parts: list[bytes] = []
            for _ in range(count):
                parts += (FRAME_OPEN, orjson.dumps("tok"), FRAME_CLOSE)
            written += count
            if written >= tokens:
                usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
                parts.append(b'data: {"id":"bare","object":"text_completion","choices":[],"usage":'
                             + orjson.dumps(usage) + b"}\n\ndata: [DONE]\n\n")
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": written < tokens})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(BareSSE(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
