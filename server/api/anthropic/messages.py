"""Anthropic's Messages API: `POST /v1/messages` (plain and streamed) and `POST /v1/messages/count_tokens`.

Clients set the base URL without `/v1` (`ANTHROPIC_BASE_URL=http://host:1234`); `anthropic-version` and
`anthropic-beta` headers are not checked. Errors use Anthropic's envelope (server/errors.py keys it by path).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request

from ...chat.session import TOOL_CHOICE_HEADER, prepare_chat
from ...engine.sampling import SamplingParams
from ...errors import APIError, api_error_body
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, SseEvent, sse_event, unless_disconnected
from .. import inference
from ..chat_run import ChatRun, Round
from ..deps import get_manager
from .blocks import MessageBuilder
from .convert import chat_spec
from .schemas import MessagesInput, MessagesRequest

PATH = "/v1/messages"


async def start_message(body: MessagesRequest, manager: ModelManager, tool_choice: str | None = None) -> Round:
    """Finds (or JIT-loads) the model, renders the prompt and submits it; errors here are plain HTTP errors.
    `tool_choice`: the lmkube-tool-choice header. Start reading the round before the next await."""
    run = await ChatRun.open(manager, body.model, ttl=body.ttl, sampling=lambda instance: _sampling(body, instance),
                             header_tool_choice=tool_choice)
    with run.instance.in_use():
        return await run.submit(chat_spec(body))


def _sampling(body: MessagesRequest, instance: ModelInstance) -> SamplingParams:
    params = inference.sampling_params(body, instance.sampling_defaults, max_tokens=body.max_tokens)
    params.stop = list(body.stop_sequences or ())
    return params


async def _events(round: Round, builder: MessageBuilder) -> AsyncIterator[list[SseEvent]]:
    """Anthropic's stream events, a batch per engine batch; a failed generation raises APIError."""
    with round.instance.in_use():
        yield builder.start()
        async for deltas in round.deltas():
            events: list[SseEvent] = []
            for delta in deltas:
                events += builder.feed(delta)
            if round.finish is not None:
                events += builder.finish(round.finish, round.result)
            if events:
                yield events


async def _stream(round: Round, builder: MessageBuilder) -> AsyncIterator[bytes]:
    try:
        async for events in _events(round, builder):
            yield b"".join(sse_event(name, data) for name, data in events)
    except APIError as exc:  # the stream has started: report it in-band
        yield sse_event("error", {"error": api_error_body(PATH, exc)["error"]})
    except Exception as exc:
        yield sse_event("error", {"error": {"type": "api_error", "message": f"Internal server error: {exc}"}})
    finally:
        round.cancel()


async def _drain(round: Round, builder: MessageBuilder) -> dict[str, Any]:
    try:
        async for _ in _events(round, builder):
            pass
    finally:
        round.cancel()
    return builder.message()


async def create_message(
    body: MessagesRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    round = await start_message(body, manager, request.headers.get(TOOL_CHOICE_HEADER))
    assert round.prepared is not None
    builder = MessageBuilder(inference.random_id("msg_", 24), round.instance.id, len(round.prepared.prompt))
    if body.stream:
        return EventStreamResponse(_stream(round, builder))
    return await unless_disconnected(request, _drain(round, builder))


async def count_tokens(
    body: MessagesInput, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, int]:
    """The prompt's length in tokens, rendered exactly as `/v1/messages` renders it; nothing is generated."""
    instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="llm")
    with instance.in_use():
        prepared = await asyncio.to_thread(prepare_chat, instance, chat_spec(body))
    return {"input_tokens": len(prepared.prompt)}
