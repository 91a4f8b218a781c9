"""Server-sent-event frames shared by the OpenAI-compatible streaming endpoints."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def error_event(message: str, *, type: str = "server_error") -> bytes:
    return b"data: " + orjson.dumps({"error": {"message": message, "type": type, "param": None,
                                               "code": None}}) + b"\n\n"


def usage_chunk(head: bytes, usage: dict[str, Any], stats: dict[str, Any] | None = None) -> bytes:
    """OpenAI's final usage chunk: no choices, just usage (stream_options.include_usage), and LM Studio's
    `stats` where the request used a draft model."""
    extra = b',"stats":' + orjson.dumps(stats) if stats else b""
    return b"data: " + head + b',"choices":[],"usage":' + orjson.dumps(usage) + extra + b"}\n\n"
