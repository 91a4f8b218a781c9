"""One plain ASGI middleware that reports every finished HTTP request to a list of observers.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses. The
observers (HTTP metrics, the `server` log stream) run on the event loop thread after the response ends.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED_ROUTE = "unmatched"  # one label value for every path no route matched (no label explosion)


@dataclass(frozen=True)
class FinishedRequest:
    method: str
    path: str
    route: str  # the matched route's template, e.g. /v1/models/{model_id:path}, else UNMATCHED_ROUTE
    status: int
    seconds: float


RequestObserver = Callable[[FinishedRequest], None]


class RequestObserverMiddleware:
    def __init__(self, app: ASGIApp, observers: Sequence[RequestObserver]) -> None:
        self.app = app
        self.observers = tuple(observers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before starting a response

        # A plain function handing back send's own awaitable: no coroutine of its own per streamed chunk.
        def send_and_note(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router writes the matched route into this same scope dict.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            finished = FinishedRequest(scope["method"], scope["path"], route, status, time.perf_counter() - started)
            for observer in self.observers:
                observer(finished)
