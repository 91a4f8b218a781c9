"""The raw-socket streaming client: OpenAI-style streaming ``/v1/completions`` (or chat) requests, every event stamped
when its bytes arrive, plus the percentile helper the metrics use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from servers import Server

EOS_TOKEN = 2  # `</s>` in lmkube.synthetic_gguf's vocabulary
# ~32 tokens with the synthetic SentencePiece vocab (common English words are single pieces); the exact count is
# read back from lmkube's usage and printed with the results.
PROMPT = (
    "the people said that you and your new model will make a good test of how many words they can use "
    "when the time has come to see what it is like"
)
REQUEST_TIMEOUT_S = 600.0
# Each a single piece in the synthetic vocab (one word ≈ one token): a different first word per client makes
# prompts share only BOS, and random runs of them make prompts of a known length (prefix_cache.py).
PROMPT_WORDS = sorted(set(PROMPT.split()))


def client_prompt(client: int) -> str:
    """Client `client`'s own prompt: a different first word, then PROMPT (for up to 29 clients)."""
    return f"{PROMPT_WORDS[client]} {PROMPT}"


@dataclass
class Stream:
    """One streaming request as the client saw it (perf_counter seconds)."""

    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each event whose text is non-empty
    empty_chunks: int = 0  # events with choices but empty text (finish chunk and anything odd)
    usage_tokens: int | None = None  # usage.completion_tokens when the server streams it
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_times)


def completion_request(server: Server, max_tokens: int, prompt: str = PROMPT,
                       extra: dict[str, Any] | None = None) -> bytes:
    """`extra` adds fields only some servers take (llama-server's `cache_prompt`, a `draft_model`)."""
    return post_request(server, "/v1/completions", {"prompt": prompt, **_streaming_fields(max_tokens, extra)})


def chat_request(server: Server, max_tokens: int, prompt: str = PROMPT, extra: dict[str, Any] | None = None) -> bytes:
    """The same as a streaming /v1/chat/completions request with one user message."""
    messages = [{"role": "user", "content": prompt}]
    return post_request(server, "/v1/chat/completions", {"messages": messages, **_streaming_fields(max_tokens, extra)})


def _streaming_fields(max_tokens: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": 0.0, "stream": True, "logit_bias": {str(EOS_TOKEN): -100},
            "stream_options": {"include_usage": True}, **(extra or {})}


def post_request(server: Server, path: str, fields: dict[str, Any]) -> bytes:
    body = orjson.dumps({"model": server.model, **fields})
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.split(b" ", 2)
    if len(parts) < 2:
        raise ConnectionError(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
    """Yields body bytes as they arrive (chunked, Content-Length or until close)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
            yield await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


def on_event(stream: Stream, data: bytes, now: float) -> None:
    if data == b"[DONE]":
        return
    event = orjson.loads(data)
    if "error" in event:
        stream.error = str(event["error"])
        return
    if usage := event.get("usage"):
        stream.usage_tokens = usage.get("completion_tokens")
        stream.prompt_tokens = usage.get("prompt_tokens")
    for choice in event.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):  # completions or chat
            stream.token_times.append(now)
        else:
            stream.empty_chunks += 1
        stream.finish_reason = choice.get("finish_reason") or stream.finish_reason


def feed_sse(stream: Stream, buffer: bytearray, now: float) -> None:
    """Consumes the complete events in buffer. sse-starlette ends lines with CRLF, lmkube with LF."""
    while True:
        lf, crlf = buffer.find(b"\n\n"), buffer.find(b"\r\n\r\n")
        ends = [(i, n) for i, n in ((lf, 2), (crlf, 4)) if i >= 0]
        if not ends:
            return
        end, sep = min(ends)
        block, buffer[:] = bytes(buffer[:end]), buffer[end + sep:]
        for line in block.splitlines():
            if line.startswith(b"data:"):
                on_event(stream, line[5:].strip(), now)


async def stream_completion(server: Server, request: bytes) -> Stream:
    """One request on its own connection; every event is stamped when its bytes arrive."""
    stream = Stream()
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        stream.sent = time.perf_counter()
        writer.write(request)
        await writer.drain()
        status, headers = await read_head(reader)
        buffer = bytearray()
        async for piece in body_pieces(reader, headers):
            buffer += piece
            if status != 200:
                continue
            feed_sse(stream, buffer, time.perf_counter())
        if status != 200:
            stream.error = f"HTTP {status}: {buffer[:300].decode(errors='replace')}"
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    return stream


async def burst(server: Server, clients: int, max_tokens: int, extra: dict[str, Any] | None = None,
                request: bytes | None = None, distinct: bool = False) -> list[Stream]:
    """`clients` simultaneous streaming requests (each on its own connection); by default /v1/completions of
    PROMPT, or with `distinct` each client's own prompt (`client_prompt`)."""
    if request is not None:
        requests = [request] * clients
    elif distinct:
        requests = [completion_request(server, max_tokens, client_prompt(i), extra) for i in range(clients)]
    else:
        requests = [completion_request(server, max_tokens, extra=extra)] * clients
    tasks = [stream_completion(server, r) for r in requests]
    # asyncio.timeout, not wait_for: wait_for leaves a cancelled gather behind on Ctrl+C ("never retrieved").
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        return list(await asyncio.gather(*tasks))

def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
