"""Anthropic's Messages API: `POST /v1/messages` (plain and streamed) and `POST /v1/messages/count_tokens`.

Clients set the base URL without `/v1` (`ANTHROPIC_BASE_URL=http://host:1234`); `anthropic-version` and
`anthropic-beta` headers are not checked. Errors use Anthropic's envelope (server/errors.py keys it by path).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from ...chat.session import TOOL_CHOICE_HEADER, PreparedChat, prepare_chat, with_header_tool_choice
from ...engine.events import TextDelta
from ...engine.generation import GenerationRequest
from ...errors import APIError, error_body
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, sse_event, unless_disconnected
from .. import inference
from ..deps import get_manager
from .blocks import Event, MessageBuilder
from .convert import chat_spec
from .schemas import MessagesInput, MessagesRequest

router = APIRouter(prefix="/v1/messages")


@dataclass(slots=True)
class MessageCall:
    """A request submitted to its instance; `events()` runs it to the end."""

    instance: ModelInstance
    prepared: PreparedChat
    generation: GenerationRequest
    builder: MessageBuilder

    async def events(self) -> AsyncIterator[list[Event]]:
        """Anthropic's stream events, a batch per engine batch; a failed generation raises APIError."""
        builder = self.builder
        output = self.prepared.new_output()
        with self.instance.in_use():
            try:
                yield builder.start()
                async for batch in self.generation:
                    events: list[Event] = []
                    for event in batch:
                        if isinstance(event, TextDelta):
                            events += builder.feed(output.feed(event.text))
                        elif event.reason == "error":
                            if events:  # what was generated before the failure still goes out
                                yield events
                            raise APIError(500, f"Generation failed: {event.error}", type="server_error")
                        else:
                            events += builder.feed(output.finish())
                            events += builder.finish(event, output.result)
                    if events:
                        yield events
            finally:
                self.generation.cancel()


async def start_message(body: MessagesRequest, manager: ModelManager, tool_choice: str | None = None) -> MessageCall:
    """Finds (or JIT-loads) the model, renders the prompt and submits it; errors here are plain HTTP errors.
    `tool_choice`: the lmkube-tool-choice header."""
    instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="llm")
    with instance.in_use():
        spec = with_header_tool_choice(chat_spec(body), tool_choice)
        prepared = await asyncio.to_thread(prepare_chat, instance, spec)
        params = inference.sampling_params(body, max_tokens=body.max_tokens)
        params.stop = list(body.stop_sequences or ())
        params.grammar = prepared.grammar
        params.render_special = prepared.render_special
        await inference.load_draft(instance, params)
        generation = inference.submit(instance, prepared.prompt, params)
    builder = MessageBuilder(inference.random_id("msg_", 24), instance.id, len(prepared.prompt))
    return MessageCall(instance, prepared, generation, builder)


async def _stream(call: MessageCall) -> AsyncIterator[bytes]:
    try:
        async for events in call.events():
            yield b"".join(sse_event(name, data) for name, data in events)
    except APIError as exc:  # the stream has started: report it in-band
        yield sse_event("error", {"error": error_body(router.prefix, exc)["error"]})
    except Exception as exc:
        yield sse_event("error", {"error": {"type": "api_error", "message": f"Internal server error: {exc}"}})


async def _drain(call: MessageCall) -> dict[str, Any]:
    async for _ in call.events():
        pass
    return call.builder.message()


@router.post("", response_model=None)
async def create_message(
    body: MessagesRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    call = await start_message(body, manager, request.headers.get(TOOL_CHOICE_HEADER))
    if body.stream:
        return EventStreamResponse(_stream(call))
    return await unless_disconnected(request, _drain(call))


@router.post("/count_tokens")
async def count_tokens(
    body: MessagesInput, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, int]:
    """The prompt's length in tokens, rendered exactly as `/v1/messages` renders it; nothing is generated."""
    instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="llm")
    with instance.in_use():
        prepared = await asyncio.to_thread(prepare_chat, instance, chat_spec(body))
    return {"input_tokens": len(prepared.prompt)}
