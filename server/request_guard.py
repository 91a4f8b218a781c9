"""The gate every HTTP request passes before the app sees it: the API token, the body's size, its text.

Plain ASGI, so it runs before FastAPI reads a byte of the body:

- A request that needs a token and lacks a valid one gets its 401 from the headers alone; its body is
  never read (an unauthenticated 300 MB upload used to be read whole, then refused).
- A body larger than the limit is refused with 413 as soon as its Content-Length (or, when chunked, the
  bytes received so far) passes the limit, without buffering the rest.
- JSON text holding a lone UTF-16 surrogate (`"\\ud800"`, or its bytes ED A0 80 written unescaped) decodes in
  Python but cannot be encoded back to UTF-8 for the tokenizer; such a body is a 400 here rather than an
  exception deep in a route.

Errors use the called family's shape (errors.error_response), like every other error.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import token_error
from .errors import APIError, error_response

# A \uD800-\uDFFF escape, or a surrogate written straight into the bytes (ED A0-BF xx: not UTF-8, but Python's
# json module decodes bodies with "surrogatepass" and lets it through); only a body holding one can hold a lone
# surrogate, so only those are decoded here.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, *, tokens: tuple[bytes, ...], public_paths: Collection[str],
                 max_body_bytes: int) -> None:
        self.app = app
        self.tokens = tokens
        self.public_paths = frozenset(public_paths)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.tokens and scope["path"] not in self.public_paths and scope["method"] != "OPTIONS":
            denied = token_error(request, self.tokens)
            if denied is not None:
                await error_response(request, denied)(scope, receive, send)
                return
        if (refused := self._too_large(request.headers.get("content-length"))) is not None:
            await error_response(request, refused)(scope, receive, send)
            return
        body = await self._read_body(receive)
        if isinstance(body, APIError):
            await error_response(request, body)(scope, receive, send)
            return
        if (invalid := unencodable_text(body)) is not None:
            await error_response(request, invalid)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self, content_length: str | None) -> APIError | None:
        try:
            declared = int(content_length) if content_length is not None else 0
        except ValueError:
            return APIError(400, f"Invalid Content-Length header: {content_length!r}.")
        if declared <= self.max_body_bytes:
            return None
        return APIError(413, f"Request body of {declared} bytes is larger than this server's limit of "
                             f"{self.max_body_bytes} bytes (lmkube serve --max-body-size).",
                        code="request_too_large")

    async def _read_body(self, receive: Receive) -> bytes | APIError:
        """The whole body (FastAPI reads it whole anyway), or the 413 once it grows past the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left; the app's own receive sees it too
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return APIError(413, f"Request body is larger than this server's limit of {self.max_body_bytes} "
                                     "bytes (lmkube serve --max-body-size).", code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def unencodable_text(body: bytes) -> APIError | None:
    """The 400 for a JSON body whose strings hold a lone surrogate, else None (invalid JSON is the app's
    to report)."""
    if not _SURROGATE.search(body):
        return None
    try:
        orjson.loads(body)  # unlike the json module, orjson refuses lone surrogates
    except orjson.JSONDecodeError as exc:
        if "surrogate" in str(exc):
            return APIError(400, f"Request body holds text that is not valid Unicode (a lone UTF-16 surrogate, "
                                 f"{exc}); send text as UTF-8 or as escaped surrogate pairs.")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's later messages (disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
